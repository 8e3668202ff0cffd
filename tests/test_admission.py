"""Admission by Ray Serve: past the Ingress's `max_ongoing_requests` and `max_queued_requests`, a request is
refused at once with 429 and Retry-After, while the admitted ones finish; a deployment behind the Ingress
whose queue is full refuses with a 429 in OpenAI's error shape. Tiny random Llama, transformers engine, so
only Ray Serve's limits are under test."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from tests.conftest import running_tiny_app

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
LONG = {"model": MODEL, "prompt": "import csv", "max_tokens": 400, "ignore_eos": True, "adaptation": {"enabled": False}}


@pytest.fixture()
def generator_queue_of_one(tmp_path_factory, small_index):
    """An application whose Generator takes 1 request and queues 1 (its own Ray cluster, gone after the test,
    before the module's `served` starts)."""
    generator = {"num_cpus": 0.5, "max_ongoing_requests": 1, "max_queued_requests": 1}
    with running_tiny_app(tmp_path_factory, small_index.directory, deploy={"generator": generator}) as app:
        yield app.url


async def test_a_full_queue_behind_the_ingress_is_an_openai_shaped_429(generator_queue_of_one):
    url = generator_queue_of_one
    async with httpx.AsyncClient(timeout=120) as client:
        responses = await asyncio.gather(*(client.post(f"{url}/v1/completions", json=LONG) for _ in range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, [(r.status_code, r.text[:200]) for r in responses]
    for refused in (r for r in responses if r.status_code == 429):
        assert refused.headers["retry-after"] == "1", refused.headers
        error = refused.json()["error"]
        assert (error["code"], error["type"], error["param"]) == ("overloaded", "server_error", None)
        assert error["message"] == "The generator is at capacity; retry shortly."
    async with httpx.AsyncClient(timeout=120) as client:  # answers again once the Generator has room
        again = await client.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 2})
    assert again.status_code == 200


@pytest.fixture(scope="module")
def served(tmp_path_factory, small_index):
    with running_tiny_app(
        tmp_path_factory,
        small_index.directory,
        deploy={"ingress": {"num_cpus": 0.25, "max_ongoing_requests": 1, "max_queued_requests": 1}},
    ) as app:
        yield app.url


async def test_over_the_limits_gets_429_with_retry_after_and_the_rest_finish(served):
    async def send(client: httpx.AsyncClient) -> tuple[int, float, httpx.Headers]:
        started = time.monotonic()
        response = await client.post(f"{served}/v1/completions", json=LONG)
        return response.status_code, time.monotonic() - started, response.headers

    async with httpx.AsyncClient(timeout=120) as client:
        outcomes = await asyncio.gather(*(send(client) for _ in range(6)))
    statuses = sorted(status for status, _, _ in outcomes)
    refused = [(seconds, headers) for status, seconds, headers in outcomes if status == 429]
    assert set(statuses) == {200, 429}, statuses  # 1 ongoing is admitted, 1 more may wait in the queue
    assert all(headers["retry-after"] == "1" and seconds < 1.0 for seconds, headers in refused)


async def test_rejected_requests_do_not_grow_memory(served):
    """Hundreds of refusals while the Ingress is kept busy: the proxy's and the Ingress's memory stay flat."""
    from benchmarks.soak import process_rss

    watched = re.compile(r"(ProxyActor|ServeReplica:sift-serve:Ingress)")
    short = {**LONG, "max_tokens": 1}
    busy = asyncio.Event()

    async with httpx.AsyncClient(timeout=120) as client:

        async def keep_busy() -> None:
            while not busy.is_set():
                await asyncio.gather(*(client.post(f"{served}/v1/completions", json=LONG) for _ in range(2)))

        async def refusals(count: int) -> int:
            refused = 0
            for _ in range(count // 20):
                responses = await asyncio.gather(
                    *(client.post(f"{served}/v1/completions", json=short) for _ in range(20))
                )
                refused += sum(r.status_code == 429 for r in responses)
            return refused

        worker = asyncio.create_task(keep_busy())
        await asyncio.sleep(1.0)
        await refusals(100)  # warm-up: connection pools and buffers reach their working size
        before = process_rss(watched)
        refused = await refusals(400)
        after = process_rss(watched)
        busy.set()
        await worker
    assert refused >= 300, refused
    for name, rss in before.items():
        assert after[name] <= rss * 1.05 + 16 * 2**20, (name, rss / 2**20, after[name] / 2**20)
