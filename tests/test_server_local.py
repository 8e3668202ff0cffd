"""The OpenAI server's Python objects without Ray: the official `openai` client against the FastAPI app
in-process, on a tiny random Llama (transformers engine), a real MiniLM index and the real trainer."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import openai
import pytest
import torch

from selection.selector import SelectOptions
from serving.app import create_app
from serving.config import Settings
from serving.contracts import SelectQuery
from serving.openai_server import local_server
from tests.conftest import live_adapters, tiny_llama_dir

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "How do I read rows from a CSV file?"}]


@pytest.fixture(scope="module")
def settings(tmp_path_factory, small_index) -> Settings:
    tiny = tiny_llama_dir(tmp_path_factory.mktemp("tiny") / MODEL)
    return Settings.model_validate(
        {
            "models": {"base_model": str(tiny)},
            "index_path": str(small_index.directory),
            "adaptation": {
                "candidates": 20,
                "max_steps": 2,
                "max_train_tokens": 32,
                "learning_rate": 1e-3,
                "context_tokens": 160,
            },
            "generator": {
                "engine": "transformers",
                "max_model_len": 256,
                "default_max_tokens": 8,
                "adapter_dir": str(tmp_path_factory.mktemp("adapters")),
            },
            "server": {"limits": {"max_steps": 8, "candidates": 50}},
        }
    )


@pytest.fixture(scope="module")
def server(settings):
    return local_server(settings)


@pytest.fixture()
def app(server):
    server.api_keys = []
    return create_app(server)


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


def adapters_left(server) -> list:
    return list(server.settings.generator.adapter_dir.iterdir())


def gauge(server) -> float:
    return live_adapters(server)


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def test_the_predicted_gain_rule_stops_adaptation(client, server):
    """A price no step can pay: selection stops before the first pick and the base model answers; at
    min_gain 0 every step up to max_steps is trained."""
    extra = {"adaptation": {"min_gain": 1000.0, "max_steps": 3}}
    done = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, extra_body=extra)
    report = done.model_extra["adaptation"]
    assert (report["steps"], report["stop_reason"], report["adapter"], report["documents"]) == (
        0,
        "min_gain",
        False,
        [],
    )
    assert len(report["sigma2"]) == 1 and done.choices[0].message.content is not None
    extra = {"adaptation": {"min_gain": 0.0, "max_steps": 3}}
    done = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, extra_body=extra)
    assert done.model_extra["adaptation"]["steps"] == 3 and done.model_extra["adaptation"]["stop_reason"] == "max_steps"


async def test_documents_in_the_context_with_and_without_training(client, server):
    plain = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={"adaptation": {"enabled": False}}
    )
    only = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={"adaptation": {"context": "prepend", "max_steps": 0}}
    )
    report = only.model_extra["adaptation"]
    assert report["context"] and report["context"] == report["documents"][: len(report["context"])]
    assert 0 < report["context_tokens"] <= 160 and (report["steps"], report["adapter"]) == (0, False)
    assert only.usage.prompt_tokens == plain.usage.prompt_tokens + report["context_tokens"]
    both = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=2,
        extra_body={"adaptation": {"context": "prepend", "context_tokens": 150, "max_steps": 2}},
    )
    report = both.model_extra["adaptation"]
    assert report["steps"] == 2 and report["adapter"] and 0 < report["context_tokens"] <= 150
    assert adapters_left(server) == []
    completion = await client.completions.create(
        model=MODEL,
        prompt="import csv",
        max_tokens=2,
        extra_body={"adaptation": {"context": "prepend", "max_steps": 0}},
    )
    report = completion.model_extra["adaptation"]
    assert report["context"] and completion.usage.prompt_tokens > report["context_tokens"] > 0
    with pytest.raises(openai.BadRequestError, match="adaptation.context"):
        await client.completions.create(
            model=MODEL, prompt="x", max_tokens=0, echo=True, extra_body={"adaptation": {"context": "prepend"}}
        )


async def test_chat_with_and_without_adaptation(client, server):
    done = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0)
    report = done.model_extra["adaptation"]
    assert report["enabled"] and report["adapter"] and report["steps"] == 2 and report["stop_reason"] == "max_steps"
    assert len(report["documents"]) == 2 and len(report["sigma2"]) == 3
    assert set(report["timings"]) == {"queue", "select", "train", "load_adapter", "generate"}
    assert done.usage.completion_tokens == 5 and done.choices[0].finish_reason == "length"
    assert adapters_left(server) == [] and gauge(server) == 0
    plain = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, extra_body={"adaptation": {"enabled": False}}
    )
    assert plain.model_extra["adaptation"]["adapter"] is False
    assert plain.model_extra["adaptation"]["stop_reason"] == "disabled"


async def test_stream_without_progress_is_openai_shaped_only(raw, server):
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await raw.post("/v1/chat/completions", json=body)
    events = sse_events(response.text)
    assert response.text.rstrip().endswith("data: [DONE]")
    assert all(e["choices"] for e in events[:-1]) and events[-1]["usage"]["completion_tokens"] == 4
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[0]["adaptation"]["steps"] == 2
    assert "stage" not in response.text and adapters_left(server) == []


async def test_progress_events_are_opt_in(client, server):
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, stream=True, extra_body={"adaptation": {"progress": True}}
    )
    chunks = [c async for c in stream]
    stages = [c.model_extra["adaptation"]["stage"] for c in chunks if not c.choices]
    assert stages == ["selected", "training", "training"]
    assert chunks[-1].model_extra["adaptation"]["steps"] == 2  # the full report rides on the finishing chunk
    assert adapters_left(server) == []


async def test_heartbeat_comments_while_training(raw, server, monkeypatch):
    monkeypatch.setattr(server.settings.server, "heartbeat_s", 0.001)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "stream": True}
    response = await raw.post("/v1/chat/completions", json=body)
    assert ": keep-alive" in response.text.splitlines()


async def test_echo_logprobs_score_the_prompt(client, server):
    prompt = "import csv\nwith open('x.csv') as f:"
    out = await client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0, extra_body={"adaptation": {"enabled": False}}
    )
    lp = out.choices[0].logprobs
    assert out.choices[0].text == prompt and lp.token_logprobs[0] is None
    ids = server.tokenizer(prompt).input_ids
    model = server.clients["generator"].generator.model
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
    expected = [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert "".join(lp.tokens) == prompt


async def test_n_choices_share_one_adapter_and_chat_logprobs(client, server):
    done = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, n=2, seed=7, logprobs=True, top_logprobs=2
    )
    assert [c.index for c in done.choices] == [0, 1] and done.usage.completion_tokens == 6
    assert done.model_extra["adaptation"]["steps"] == 2  # trained once
    for choice in done.choices:
        content = choice.logprobs.content
        assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
        assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert adapters_left(server) == []


async def test_streamed_completion_logprobs_and_echo(client):
    prompt = "def read_rows(path):"
    stream = await client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=3,
        echo=True,
        logprobs=1,
        stream=True,
        temperature=0,
        extra_body={"adaptation": {"enabled": False}},
    )
    chunks = [c async for c in stream if c.choices]
    text = "".join(c.choices[0].text for c in chunks)
    assert text.startswith(prompt)
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    whole = await client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=3,
        echo=True,
        logprobs=1,
        temperature=0,
        extra_body={"adaptation": {"enabled": False}},
    )
    assert text == whole.choices[0].text and tokens == whole.choices[0].logprobs.tokens


async def test_sampling_extensions_reach_the_engine(client):
    plain = {"adaptation": {"enabled": False}}

    async def text(**kwargs) -> tuple[str, str]:
        extra = {**plain, **kwargs.pop("extra", {})}
        out = await client.completions.create(model=MODEL, prompt="import csv", extra_body=extra, **kwargs)
        return out.choices[0].text, out.choices[0].finish_reason

    greedy = await text(max_tokens=6, temperature=0)
    assert await text(max_tokens=6, temperature=1.0, extra={"top_k": 1}) == greedy  # top-k 1 is greedy
    seeded = await text(max_tokens=6, temperature=1.0, seed=3)
    assert await text(max_tokens=6, temperature=1.0, seed=3) == seeded
    assert await text(max_tokens=6, temperature=0, extra={"repetition_penalty": 5.0}) != greedy
    forced = await client.completions.create(
        model=MODEL, prompt="import csv", max_tokens=5, temperature=0, extra_body={**plain, "ignore_eos": True}
    )
    assert forced.usage.completion_tokens == 5 and forced.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "body,status,code_or_param",
    [
        ({"adaptation": {"max_step": 2}}, 400, "adaptation.max_step"),
        ({"adaptation": {"alpha": -1}}, 400, "adaptation.alpha"),
        ({"adaptation": {"min_gain": -0.5}}, 400, "adaptation.min_gain"),
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


# ---- real disconnects, over HTTP (uvicorn), in each window of the adapter's life ----------------------


@pytest.fixture(scope="module")
def live(server):
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    while not served.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    served.should_exit = True
    thread.join(10)


async def eventually_clean(server, seconds: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    engine = server.clients["generator"]
    while loop.time() < deadline:
        if adapters_left(server) == [] and gauge(server) == 0 and await engine.loaded_adapters() == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"left behind: {adapters_left(server)}, gauge {gauge(server)}")


async def hang_up_after(url: str, body: dict, marker: str) -> None:
    """Stream `body`, and close the connection at the first line containing `marker` but no empty content."""
    async with httpx.AsyncClient(timeout=60) as c, c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if marker in line and (marker != '"content":"' or '"content":""' not in line):
                return  # leaving the block closes the connection mid-stream


async def test_disconnect_after_training_before_generation_starts(live, server, monkeypatch):
    service = server.clients["generator"]
    called = asyncio.Event()

    async def not_started_yet(request_id, prompt_ids, sampling, adapter):
        called.set()  # the adapter is handed over, but this generator has not taken the request yet
        await asyncio.Event().wait()
        yield  # pragma: no cover

    monkeypatch.setattr(service, "generate", not_started_yet)
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 4}
    await hang_up_after(live, body, '"role":"assistant"')  # the opening chunk: training is over
    await eventually_clean(server)


async def test_disconnect_during_generation(live, server):
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 200, "ignore_eos": True}
    await hang_up_after(live, body, '"content":"')
    await eventually_clean(server)


async def test_disconnect_during_training(live, server):
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "adaptation": {"max_steps": 8, "progress": True}}
    await hang_up_after(live, body, '"stage":"training"')
    await eventually_clean(server)


@pytest.mark.parametrize("context", [False, True], ids=["prompt", "documents-in-context"])
async def test_tokenisation_does_not_block_the_event_loop(raw, server, monkeypatch, context):
    """Rendering a huge prompt, or fitting documents before it (context: prepend, up to ~7 renderings), runs
    off the Ingress's event loop: other requests are answered meanwhile."""
    import time

    from serving.context import PREAMBLE

    tokenize = server.tokenizer.apply_chat_template

    def slow(messages, *args, **kwargs):
        if not context or PREAMBLE in messages[0]["content"]:
            time.sleep(1.0)  # a huge prompt, or documents being fitted
        return tokenize(messages, *args, **kwargs)

    monkeypatch.setattr(server.tokenizer, "apply_chat_template", slow)
    adaptation = {"context": "prepend", "max_steps": 0} if context else {"enabled": False}
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1, "adaptation": adaptation}
    chat = asyncio.create_task(raw.post("/v1/chat/completions", json=body))
    pause = 0.5 if context else 0.2  # with documents: past selection, into the fitting
    asked = asyncio.get_running_loop().time() + pause
    await asyncio.sleep(pause)
    health = await raw.get("/health")
    late = asyncio.get_running_loop().time() - asked
    assert health.status_code == 200 and not chat.done()  # answered while the prompt was being tokenised
    assert late < 0.9, late  # not after a 1 s rendering held the event loop
    response = await chat
    assert response.status_code == 200 and (response.json()["adaptation"]["context"] or not context)
