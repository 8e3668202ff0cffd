"""Several Trainer replicas (each a model copy) behind one Ray Serve app: requests spread over them and
each gets its adapter. Tiny random Llama and the transformers engine, so only Ray Serve is under test."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.conftest import running_tiny_app

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def served(tmp_path_factory, small_index):
    with running_tiny_app(
        tmp_path_factory,
        small_index.directory,
        adaptation={"candidates": 20, "min_gain": 0, "max_steps": 3, "max_train_tokens": 32},
        trainer={"max_batch": 2},
        generator={"default_max_tokens": 4},
        deploy={"trainer": {"num_cpus": 0.25, "replicas": 2}},
    ) as app:
        yield app.url


async def test_two_trainer_replicas_serve_concurrent_adapted_requests(served):
    from ray import serve

    trainer = serve.status().applications["sift-serve"].deployments["Trainer"]
    assert trainer.replica_states.get("RUNNING") == 2
    client = openai.AsyncOpenAI(base_url=f"{served}/v1", api_key="unused", timeout=120)
    prompts = ["csv rows", "heap queue", "glob patterns", "shell quoting", "bisect insort", "fnmatch case"]
    answers = await asyncio.gather(
        *(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}]) for p in prompts)
    )
    reports = [a.model_extra["adaptation"] for a in answers]
    assert all(r["adapter"] and r["steps"] == 3 for r in reports), reports


async def test_a_conversation_reaches_its_session_on_two_replicas(served):
    """The Trainer's session router sends every turn of a session to the replica holding its state: 4
    conversations of 3 turns, run at once, all continue (with random routing, each later turn would miss half
    the time; with Serve's multiplexed routing, a quick second turn could miss too, as it did in CI)."""
    client = openai.AsyncOpenAI(base_url=f"{served}/v1", api_key="unused", timeout=120)
    prompts = ["csv rows", "heap queue", "glob patterns"]

    async def conversation(name: str) -> list[dict]:
        reports = []
        for text in prompts:
            extra = {"adaptation": {"session": name, "gain_budget": None}}
            done = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": text}], extra_body=extra
            )
            reports.append(done.model_extra["adaptation"]["session"])
        return reports

    chats = await asyncio.gather(*(conversation(f"chat-{i}") for i in range(4)))
    for reports in chats:
        assert [r["turn"] for r in reports] == [1, 2, 3], reports
        assert [r["fresh"] for r in reports] == ["new", None, None]
        assert reports[2]["carried_steps"] == reports[0]["new_steps"] + reports[1]["new_steps"]
