"""The OpenAI server's Python objects without Ray: adaptation, streaming, sampling and disconnects, with
the official `openai` client against the in-process app of `tests.local_app`."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

from serving.app import create_app
from tests.conftest import uvicorn_thread
from tests.local_app import (  # noqa: F401  (fixtures)
    MESSAGES,
    MODEL,
    adapters_left,
    app,
    client,
    gauge,
    raw,
    server,
    settings,
    sse_events,
)


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


async def test_the_gain_budget_rule_cuts_the_picks(client, server):
    """A budget no step can meet: every pick is dropped (the trace keeps only the prior), the reason
    is gain_budget and the base model answers; a zero budget keeps every pick."""
    extra = {"adaptation": {"min_gain": 0.0, "gain_budget": 1000.0, "max_steps": 3}}
    done = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, extra_body=extra)
    report = done.model_extra["adaptation"]
    assert (report["steps"], report["stop_reason"], report["adapter"], report["documents"]) == (
        0,
        "gain_budget",
        False,
        [],
    )
    assert len(report["sigma2"]) == 1
    extra = {"adaptation": {"min_gain": 0.0, "gain_budget": 0.0, "max_steps": 3}}
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
    assert set(report["timings"]) == {"queue", "merge", "select", "train", "load_adapter", "generate"}
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


# ---- real disconnects, over HTTP (uvicorn), in each window of the adapter's life ----------------------


@pytest.fixture(scope="module")
def live(server):
    with uvicorn_thread(create_app(server)) as url:
        yield url


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
