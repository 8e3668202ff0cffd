"""The one configuration model: sources in order (flag > env > file > default), merged per key, checked."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from serving.config import Settings


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "sift.yaml"
    path.write_text(
        "trainer:\n  rank: 8\nadaptation:\n  max_steps: 3\nserver:\n  port: 9000\n  api_keys: [from-file]\n"
    )
    return path


def test_sections_merge_key_by_key(config_file):
    settings = Settings.load(config_file, {"adaptation": {"max_steps": 4}, "trainer": {"lora_alpha": 8}})
    assert (settings.adaptation.max_steps, settings.trainer.rank, settings.server.port) == (4, 8, 9000)
    assert settings.adaptation.learning_rate == Settings().adaptation.learning_rate  # untouched keys keep defaults


def test_precedence_flag_over_env_over_file(config_file, monkeypatch):
    monkeypatch.setenv("SIFT_SERVE_ADAPTATION__MAX_STEPS", "7")
    monkeypatch.setenv("SIFT_SERVE_SERVER__API_KEYS", '["from-env"]')
    from_env = Settings.load(config_file)
    assert from_env.adaptation.max_steps == 7 and from_env.trainer.rank == 8
    assert from_env.server.keys() == ["from-env"]
    assert Settings.load(config_file, {"adaptation": {"max_steps": 2}}).adaptation.max_steps == 2


def test_key_file_adds_keys(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("alpha\n\n  beta  \n")
    settings = Settings.load(None, {"server": {"api_keys": ["inline"], "api_key_file": str(keys)}})
    assert settings.server.keys() == ["inline", "alpha", "beta"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"trainer": {"bogus": 1}}, "bogus"),
        ({"adaptation": {"learning_rate": float("nan")}}, "learning_rate"),
        ({"adaptation": {"lambda": 1e-9}}, "lambda"),
        ({"adaptation": {"max_steps": 40}}, "server.limits.max_steps"),
        ({"server": {"heartbeat_s": 30}}, "heartbeat_s"),
    ],
)
def test_bad_settings_are_refused_with_the_key(overrides, message):
    with pytest.raises(ValidationError, match=message):
        Settings.load(None, overrides)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        Settings.load(tmp_path / "nope.yaml")


def test_engine_lora_rank_rounds_up_to_what_vllm_accepts():
    from serving.engines.vllm_engine import engine_lora_rank

    assert [engine_lora_rank(r) for r in (1, 4, 8, 12, 16, 100)] == [1, 8, 8, 16, 16, 128]
    with pytest.raises(ValueError, match="largest LoRA rank"):
        engine_lora_rank(1000)


def test_cli_flags_override_env_and_file(config_file, monkeypatch):
    from serving.cli import _settings

    monkeypatch.setenv("SIFT_SERVE_SERVER__PORT", "9100")
    assert _settings(config_file).server.port == 9100
    settings = _settings(
        config_file,
        server__port=9200,
        server__api_keys=["flag-key"],
        server__served_model_name="m",
        generator__max_model_len=512,
    )
    assert (settings.server.port, settings.server.keys(), settings.server.served_model_name) == (
        9200,
        ["flag-key"],
        "m",
    )
    assert settings.generator.max_model_len == 512 and settings.trainer.rank == 8  # the file's other keys stay


@pytest.mark.parametrize("key", ["", "   ", " padded "])
def test_empty_or_blank_api_keys_are_refused_from_every_source(key, tmp_path, monkeypatch):
    """An empty key would match a request without credentials: refused at start-up, whatever its source."""
    with pytest.raises(ValidationError, match="server.api_keys"):
        Settings.load(None, {"server": {"api_keys": [key]}})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"server": {"api_keys": ["good", key]}}))
    with pytest.raises(ValidationError, match="server.api_keys"):
        Settings.load(config)
    monkeypatch.setenv("SIFT_SERVE_SERVER__API_KEYS", json.dumps([key]))
    with pytest.raises(ValidationError, match="server.api_keys"):
        Settings.load(None)


def test_a_key_file_without_keys_is_refused(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("\n   \n")
    settings = Settings.load(None, {"server": {"api_key_file": str(keys)}})
    with pytest.raises(ValueError, match="holds no key"):
        settings.server.keys()


def test_the_cli_refuses_an_empty_api_key_before_starting_anything():
    from typer.testing import CliRunner

    from serving.cli import app

    result = CliRunner().invoke(app, ["serve", "--api-key", ""])
    assert result.exit_code == 2 and "empty or blank key" in result.output


def test_a_selector_scaled_to_zero_is_refused():
    """A request is admitted only while the Selector has a running replica, so it could never scale up."""
    with pytest.raises(ValidationError, match="min_replicas must be >= 1"):
        Settings.load(None, {"deploy": {"selector": {"num_cpus": 0.25, "autoscaling": {"min_replicas": 0}}}})
