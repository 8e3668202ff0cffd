"""Faults injected into the running server, each with its outcome asserted: training that raises half way,
a Trainer or Generator replica killed mid-request (under Ray Serve), an index that is missing or corrupt at
start-up. Never a hang, never a leaked adapter. (The vLLM engine dying is `test_vllm_engine.py`; overload is
`test_admission.py`.)"""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from serving.app import create_app
from serving.cli import app as cli
from serving.openai_server import local_server
from tests.conftest import live_adapters, running_app, tiny_app_settings, tiny_llama_dir

MODEL = "SmolLM2-135M-Instruct"
PROMPT = [{"role": "user", "content": "How do I read rows from a CSV file?"}]


async def test_training_that_raises_half_way_answers_with_the_base_model(tmp_path, small_index):
    settings = tiny_app_settings(
        tiny_llama_dir(tmp_path / "tiny"),
        small_index.directory,
        adaptation={
            "max_steps": 4,
            "max_train_tokens": 32,
            "min_gain": 0,
        },  # fixed step counts (rule: test_server_local)
        generator={"max_model_len": 256, "adapter_dir": str(tmp_path / "adapters")},
    )
    server = local_server(settings)
    trainer = server.clients["trainer"].trainer
    step, calls = trainer._next_rows, []

    def fails_on_the_second_step(jobs):
        calls.append(len(jobs))
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return step(jobs)

    trainer._next_rows = fails_on_the_second_step
    body = {"model": "tiny", "messages": PROMPT, "max_tokens": 3}
    transport = httpx.ASGITransport(app=create_app(server))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=300) as client:
        response = await client.post("/v1/chat/completions", json=body)
        report = response.json()["adaptation"]
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] is not None
        assert report["error"] == "training failed; answered by the base model"
        assert report["adapter"] is False and len(calls) == 2
        assert list((tmp_path / "adapters").iterdir()) == [] and live_adapters(server) == 0
        trainer._next_rows = step
        again = await client.post("/v1/chat/completions", json=body)
        assert again.json()["adaptation"]["steps"] == 4  # the trainer's loop survived


@pytest.mark.parametrize("broken", ["missing", "index.faiss", "embeddings.npy", "docs.sqlite", "manifest.json"])
def test_a_missing_or_corrupt_index_stops_start_up_naming_the_file(small_index, tmp_path, broken):
    copy = tmp_path / "index"
    shutil.copytree(small_index.directory, copy)
    if broken == "missing":
        shutil.rmtree(copy)
        named = "manifest.json"
    else:
        (copy / broken).write_bytes(b"\x00garbage, not what was written" * 10)
        named = broken
    result = CliRunner().invoke(cli, ["serve", "--index", str(copy), "--engine", "transformers"])
    assert result.exit_code != 0
    assert named in result.output and "Traceback" not in result.output, result.output


# ---- replicas killed under Ray Serve -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory, small_index, default_model_dir):
    """The default model (real trainer steps take ~1 s, so a request is killable mid-way), the transformers
    engine (it restarts in seconds), one Ray Serve application."""
    adapters = tmp_path_factory.mktemp("adapters")
    settings = tiny_app_settings(
        default_model_dir,
        small_index.directory,
        adaptation={"candidates": 30, "min_gain": 0, "max_steps": 6, "max_train_tokens": 128},
        generator={"max_model_len": 1024, "adapter_dir": str(adapters)},
    )
    with running_app(settings) as app:
        yield app, adapters


def kill(deployment: str) -> None:
    import ray

    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"]]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def events(url: str, body: dict, on_event, timeout: float = 120) -> list[dict]:
    """Stream a chat request; `on_event(event)` is called for each data event; returns them all."""
    seen = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                seen.append(json.loads(line[6:]))
                on_event(seen[-1])
    return seen


def recovers(url: str, adapters, timeout_s: float = 300) -> dict:
    """Poll until an adapted request is answered again; every answer meanwhile is 200 or a clean 503."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = httpx.post(
            f"{url}/v1/chat/completions", json={"model": MODEL, "messages": PROMPT, "max_tokens": 4}, timeout=120
        )
        assert response.status_code in (200, 503), response.text
        if response.status_code == 503:
            assert response.headers["retry-after"] and response.json()["error"]["code"] == "unavailable"
        elif response.json()["adaptation"]["steps"] == 6:
            assert wait_until(lambda: list(adapters.iterdir()) == [], 60), list(adapters.iterdir())
            return response.json()
        time.sleep(2)
    raise AssertionError("no adapted answer after the replica was killed")


def wait_until(check, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.5)
    return check()


@pytest.mark.slow
def test_trainer_killed_mid_training_is_a_clean_error_then_recovers(served):
    app, adapters = served
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": 4, "stream": True, "adaptation": {"progress": True}}
    killed = threading.Event()

    def on_event(event):
        if event.get("adaptation", {}).get("stage") == "training" and not killed.is_set():
            killed.set()
            kill("Trainer")

    seen = events(app.url, body, on_event)
    assert killed.is_set()
    assert seen[-1]["error"]["code"] == "unavailable"  # the stream had begun: one error event, then [DONE]
    plain = httpx.post(
        f"{app.url}/v1/chat/completions",
        json={"model": MODEL, "messages": PROMPT, "max_tokens": 2, "adaptation": {"enabled": False}},
        timeout=120,
    )
    assert plain.status_code == 200  # the base model still answers while the Trainer restarts
    recovers(app.url, adapters)


@pytest.mark.slow
def test_generator_killed_mid_answer_is_a_clean_error_then_recovers(served):
    app, adapters = served
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    killed = threading.Event()

    def on_event(event):
        if event.get("choices") and event["choices"][0]["delta"].get("content") and not killed.is_set():
            killed.set()
            kill("Generator")

    seen = events(app.url, body, on_event)
    assert killed.is_set() and seen[-1]["error"]["code"] == "unavailable"
    started = time.monotonic()
    after = httpx.post(
        f"{app.url}/v1/chat/completions", json={"model": MODEL, "messages": PROMPT, "max_tokens": 2}, timeout=120
    )
    assert after.status_code in (200, 503) and time.monotonic() - started < 60
    if after.status_code == 503:
        assert after.headers["retry-after"] == "1"
    recovers(app.url, adapters)  # and the killed replica's adapter directory is cleared by its successor
