"""The OpenAI server's HTTP surface without Ray: errors in OpenAI's shape, limits, auth, headers, metrics,
health and the fallbacks when a part fails (the in-process app of `tests.local_app`)."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

from selection.selector import SelectOptions
from serving.app import create_app
from serving.contracts import SelectQuery
from tests.local_app import MESSAGES, MODEL, adapters_left, app, client, gauge, raw, server, settings  # noqa: F401


@pytest.mark.parametrize(
    "body,status,code_or_param",
    [
        ({"adaptation": {"max_step": 2}}, 400, "adaptation.max_step"),
        ({"adaptation": {"alpha": -1}}, 400, "adaptation.alpha"),
        ({"adaptation": {"min_gain": -0.5}}, 400, "adaptation.min_gain"),
        ({"adaptation": {"gain_budget": -0.1}}, 400, "adaptation.gain_budget"),
        ({"adaptation": {"context": "append"}}, 400, "adaptation.context"),
        ({"adaptation": {"context_tokens": 5000}}, 400, "server.limits.context_tokens"),
        ({"adaptation": {"context": "prepend", "context_tokens": 250}}, 400, "context_length_exceeded"),
        ({"adaptation": {"lambda": 1e-8}}, 400, "adaptation.lambda"),
        ({"adaptation": {"max_steps": 9}}, 400, "server.limits.max_steps"),
        ({"adaptation": {"candidates": 51}}, 400, "server.limits.candidates"),
        ({"adaptation": {"time_budget_s": 1e9}}, 400, "server.limits.time_budget_s"),
        ({"adaptation": {"max_train_tokens": 4096}}, 400, "server.limits.max_train_tokens"),
        ({"n": 9}, 400, "n"),
        ({"seed": 2**64}, 400, "seed"),
        ({"seed": -(2**63) - 1}, 400, "seed"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"response_format": {"type": "json_object"}}, 400, "response_format"),
        ({"logit_bias": {"50256": -100}}, 400, "logit_bias"),
        ({"top_logprobs": 2}, 400, "top_logprobs"),
        ({"model": "gpt-4"}, 404, "model_not_found"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "context_length_exceeded"),
        ({"max_tokens": 10_000}, 400, "context_length_exceeded"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "\ud800 lone surrogate"}]}, 400, "surrogate"),
    ],
)
async def test_bad_requests_get_openai_errors(raw, body, status, code_or_param):
    payload = {"model": MODEL, "messages": MESSAGES, **body}
    response = await raw.post(
        "/v1/chat/completions", content=json.dumps(payload), headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert code_or_param in (error["code"], error["param"]) or code_or_param in error["message"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_numbers_are_refused(raw, literal):
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "temperature": 0}).replace(
        '"temperature": 0', f'"temperature": {literal}'
    )
    response = await raw.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"


async def test_unknown_fields_are_ignored_with_one_warning(raw, caplog):
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 2,
        "store": False,
        "metadata": {"a": "b"},
        "parallel_tool_calls": True,
        "service_tier": "auto",
        "adaptation": {"enabled": False},
    }
    with caplog.at_level(logging.WARNING, logger="serving.app"):
        response = await raw.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    warnings = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert warnings == ["ignoring unsupported request fields: metadata, parallel_tool_calls, service_tier, store"]


async def test_operator_switch_and_whitespace_prompts(raw, server, monkeypatch):
    monkeypatch.setattr(server.settings.adaptation, "enabled", False)
    on = await raw.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "adaptation": {"enabled": True}}
    )
    assert on.status_code == 400 and on.json()["error"]["code"] == "adaptation_disabled"
    off = await raw.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2})
    assert off.status_code == 200 and off.json()["adaptation"]["enabled"] is False
    monkeypatch.setattr(server.settings.adaptation, "enabled", True)
    blank = await raw.post("/v1/completions", json={"model": MODEL, "prompt": "   \n "})
    assert blank.status_code == 400 and blank.json()["error"]["param"] == "prompt"


async def test_one_invalid_prompt_fails_only_itself_in_a_selection_batch(server):
    selector = server.clients["selector"]
    queries = [SelectQuery(p, SelectOptions(2, candidates=10)) for p in ("csv rows", "   ", "heap queue")]
    outcomes = await asyncio.gather(*(selector.select(q) for q in queries), return_exceptions=True)
    assert isinstance(outcomes[1], ValueError)
    assert len(outcomes[0].documents) == 2 and len(outcomes[2].documents) == 2


async def test_body_size_limit(raw, server):
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (server.settings.server.max_body_bytes + 1)}]}
    response = await raw.post("/v1/chat/completions", json=big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


async def test_auth_on_every_route_but_health(raw, server, monkeypatch):
    server.api_keys = ["first-key", "second-key"]
    try:
        for path in ("/v1/models", "/metrics", "/docs", "/openapi.json"):
            denied = await raw.get(path)
            assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key", path
        assert (await raw.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status_code == 401
        ok = await raw.get("/v1/models", headers={"Authorization": "Bearer second-key"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL
        assert (await raw.get("/health")).status_code == 200
    finally:
        server.api_keys = []


async def test_metrics_can_be_public(server):
    server.api_keys = ["k"]
    server.settings.server.metrics_public = True
    try:
        app = create_app(server)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            public = await c.get("/metrics")
        assert public.status_code == 200 and "sift_adapters_live" in public.text and "csv" not in public.text.lower()
    finally:
        server.api_keys, server.settings.server.metrics_public = [], False


async def test_request_id_in_header_response_and_logs(raw, caplog):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "adaptation": {"enabled": False}, "bogus": 1}
    with caplog.at_level(logging.WARNING):
        response = await raw.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "req-42"})
    assert response.headers["x-request-id"] == "req-42" and response.json()["id"] == "chatcmpl-req-42"
    assert any(getattr(r, "request_id", None) == "req-42" for r in caplog.records if "ignoring" in r.getMessage())
    forged = await raw.get("/health", headers={"X-Request-Id": "bad id\nINFO forged"})
    assert forged.headers["x-request-id"] != "bad id\nINFO forged"


async def test_cors_only_when_configured(server):
    server.settings.server.cors_origins = ["https://app.example"]
    try:
        app = create_app(server)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            pre = await c.options(
                "/v1/chat/completions",
                headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
            )
            assert pre.headers["access-control-allow-origin"] == "https://app.example"
    finally:
        server.settings.server.cors_origins = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(server)), base_url="http://t") as c:
        assert "access-control-allow-origin" not in (await c.get("/health", headers={"Origin": "https://x"})).headers


async def test_health_names_the_part_that_is_not_ready(raw, server, monkeypatch):
    assert (await raw.get("/health")).json()["status"] == "ok"

    async def down() -> str:
        raise RuntimeError("engine gone")

    monkeypatch.setattr(server.clients["generator"], "ready", down)
    response = await raw.get("/health")
    assert response.status_code == 503 and response.json()["parts"]["generator"].startswith("not ready")
    assert response.json()["parts"]["selector"].startswith("ready")


async def test_openapi_describes_the_typed_api(raw):
    schema = (await raw.get("/openapi.json")).json()
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")
    assert "AdaptationOptions" in schema["components"]["schemas"]
    assert "ChatCompletionResponse" in json.dumps(chat["responses"]["200"])


async def test_training_failure_falls_back_to_the_base_model(client, server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(server.clients["trainer"].trainer, "submit", broken)
    done = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    report = done.model_extra["adaptation"]
    assert report["adapter"] is False and report["stop_reason"] == "error" and "base model" in report["error"]
    assert done.choices[0].message.content is not None


async def test_streamed_errors_after_the_first_byte(raw, server, monkeypatch):
    engine = server.clients["generator"].generator
    decode = engine._decode

    def decode_then_fail(model, prompt_ids, sampling, index, stop, emit, load_s):
        def emit_then_fail(chunk):
            emit(chunk)
            raise RuntimeError("secret engine detail")

        decode(model, prompt_ids, sampling, index, stop, emit_then_fail, load_s)

    monkeypatch.setattr(engine, "_decode", decode_then_fail)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    response = await raw.post("/v1/chat/completions", json=body)
    lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert json.loads(lines[-2][6:])["error"]["type"] == "server_error" and lines[-1] == "data: [DONE]"
    assert "secret" not in response.text
    assert adapters_left(server) == [] and gauge(server) == 0


async def test_unexpected_errors_do_not_leak_internals(raw, server, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("secret internal detail")

    monkeypatch.setattr(server, "_chat_prompt_ids", broken)
    response = await raw.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
    assert response.status_code == 500
    assert "secret" not in response.text and "Traceback" not in response.text
