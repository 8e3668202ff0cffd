"""The OpenAI server's Python objects without Ray: the official `openai` client against the FastAPI app
in-process, on a tiny random Llama (transformers generator), a real MiniLM index and the real trainer."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from serving.app import create_app
from serving.config import Settings
from serving.openai_server import local_server
from tests.conftest import tiny_llama_dir


@pytest.fixture(scope="module")
def settings(tmp_path_factory, small_index) -> Settings:
    tiny = tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    return Settings.model_validate({
        "models": {"base_model": str(tiny)},
        "index_path": str(small_index.directory),
        "selection": {"candidates": 20},
        "trainer": {"max_steps": 2, "max_train_tokens": 32, "learning_rate": 1e-3,
                    "adapter_dir": str(tmp_path_factory.mktemp("adapters"))},
        "generator": {"engine": "transformers", "max_model_len": 256, "default_max_tokens": 8},
    })  # fmt: skip


@pytest.fixture(scope="module")
def server(settings):
    return local_server(settings)


@pytest.fixture()
def app(server):
    server.settings.server.api_key = None
    app = create_app()
    app.state.server = server
    return app


@pytest.fixture()
async def client(app):
    transport = httpx.ASGITransport(app=app)
    async with openai.AsyncOpenAI(
        base_url="http://test/v1", api_key="none", http_client=httpx.AsyncClient(transport=transport)
    ) as c:
        yield c


@pytest.fixture()
async def raw(app):
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # as a real server: log, answer 500
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


MESSAGES = [{"role": "user", "content": "How do I read rows from a CSV file?"}]


def adapter_files(settings) -> list:
    return list(settings.trainer.adapter_dir.iterdir())


async def test_chat_with_and_without_ttft(client, server, settings):
    done = await client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=5, temperature=0)
    report = done.model_extra["ttft"]
    assert report["enabled"] and report["adapter"] and report["steps"] == 2
    assert len(report["documents"]) == 2 and len(report["sigma2"]) == 3
    assert set(report["timings"]) == {"queue", "select", "train", "load_adapter", "generate"}
    assert done.usage.completion_tokens == 5 and done.choices[0].finish_reason == "length"
    assert adapter_files(settings) == [] and server.metrics.adapters_live._value.get() == 0
    plain = await client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=5, temperature=0, extra_body={"ttft": {"enabled": False}}
    )
    assert plain.model_extra["ttft"]["adapter"] is False and plain.model_extra["ttft"]["steps"] == 0


async def test_streaming_sends_progress_then_tokens(client, settings):
    stream = await client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [c async for c in stream]
    stages = [c.model_extra["ttft"].get("stage") for c in chunks if c.model_extra.get("ttft") and not c.choices]
    assert stages[0] == "selected" and stages.count("training") == 2
    first_content = next(c for c in chunks if c.choices)
    assert first_content.choices[0].delta.role == "assistant" and first_content.model_extra["ttft"]["steps"] == 2
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].choices == []
    assert adapter_files(settings) == []


async def test_echo_logprobs_score_the_prompt(client, server, settings):
    prompt = "import csv\nwith open('x.csv') as f:"
    out = await client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=0, echo=True, logprobs=0, extra_body={"ttft": {"enabled": False}}
    )
    lp = out.choices[0].logprobs
    assert out.choices[0].text == prompt and lp.token_logprobs[0] is None
    ids = server.tokenizer(prompt).input_ids
    model = server.generator.service.generator.model
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
    expected = [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert "".join(lp.tokens) == prompt


@pytest.mark.parametrize(
    "body,status,code_or_param",
    [
        ({"ttft": {"max_step": 2}}, 400, "ttft.max_step"),
        ({"ttft": {"alpha": -1}}, 400, "ttft.alpha"),
        ({"n": 2}, 400, "n"),
        ({"bogus": 1}, 400, "bogus"),
        ({"model": "gpt-4"}, 404, "model_not_found"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "context_length_exceeded"),
        ({"max_tokens": 10_000}, 400, "context_length_exceeded"),
        ({"messages": []}, 400, "messages"),
    ],
)
async def test_bad_requests_get_openai_errors(raw, body, status, code_or_param):
    payload = {"model": "tiny-llama", "messages": MESSAGES, **body}
    response = await raw.post("/v1/chat/completions", json=payload)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert code_or_param in (error["code"], error["param"]) or code_or_param in error["message"]


async def test_invalid_json_auth_and_capacity(raw, server):
    bad = await raw.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    server.settings.server.api_key = "sekrit"
    try:
        assert (await raw.get("/v1/models")).status_code == 401
        ok = await raw.get("/v1/models", headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "tiny-llama"
    finally:
        server.settings.server.api_key = None
    server._in_flight = server.settings.server.max_pending
    try:
        full = await raw.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": MESSAGES})
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
    finally:
        server._in_flight = 0


async def test_health_models_metrics(raw):
    assert (await raw.get("/health")).json() == {"status": "ok"}
    metrics = (await raw.get("/metrics")).text
    for name in ("sift_requests_total", "sift_stage_seconds", "sift_steps_trained_total", "sift_adapters_live"):
        assert name in metrics


async def test_training_failure_falls_back_to_the_base_model(client, server, monkeypatch, settings):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(server.trainer.service.trainer, "train", broken)
    done = await client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=3)
    report = done.model_extra["ttft"]
    assert report["adapter"] is False and report["stop_reason"] == "error" and "base model" in report["error"]
    assert done.choices[0].message.content is not None


async def test_unexpected_errors_do_not_leak_internals(raw, server, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("secret internal detail")

    monkeypatch.setattr(server, "_chat_prompt", broken)
    response = await raw.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": MESSAGES})
    assert response.status_code == 500
    assert "secret" not in response.text and "Traceback" not in response.text
