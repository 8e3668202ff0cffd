"""Admission behind the Ingress: a deployment whose Ray Serve queue is full (`max_queued_requests`) refuses
the Ingress's call, and the client gets a 429 in OpenAI's error shape with Retry-After (Serve's own proxy
refusals, tested in test_admission.py, are Serve's plain text). Tiny random Llama, transformers engine."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import running_app, tiny_app_settings, tiny_llama_dir

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def served(tmp_path_factory, small_index):
    settings = tiny_app_settings(
        tiny_llama_dir(tmp_path_factory.mktemp("tiny") / MODEL),
        small_index.directory,
        server={"generator": {"num_cpus": 0.5, "max_ongoing_requests": 1, "max_queued_requests": 1}},
    )
    with running_app(settings) as app:
        yield app.url


async def test_a_full_queue_behind_the_ingress_is_an_openai_shaped_429(served):
    body = {
        "model": MODEL,
        "prompt": "import csv",
        "max_tokens": 400,
        "ignore_eos": True,
        "adaptation": {"enabled": False},
    }
    async with httpx.AsyncClient(timeout=120) as client:
        responses = await asyncio.gather(*(client.post(f"{served}/v1/completions", json=body) for _ in range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, [(r.status_code, r.text[:200]) for r in responses]
    for refused in (r for r in responses if r.status_code == 429):
        assert refused.headers["retry-after"] == "1", refused.headers
        error = refused.json()["error"]
        assert (error["code"], error["type"], error["param"]) == ("overloaded", "server_error", None)
        assert error["message"] == "The generator is at capacity; retry shortly."
    # The Ingress goes on answering once the Generator has room again.
    async with httpx.AsyncClient(timeout=120) as client:
        again = await client.post(f"{served}/v1/completions", json={**body, "max_tokens": 2})
    assert again.status_code == 200
