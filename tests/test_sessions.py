"""Conversations that learn once (`adaptation.session`): the store's limits, and through the official
`openai` client against the in-process server (tiny random Llama, real MiniLM index and trainer): carry-over
between turns, selection conditioned on what was trained, expiry, isolation between API keys, deletion, and
nothing left behind."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

from adapters.sessions import Fresh, Session, SessionStore
from adapters.state import SlotState
from selection.selector import GivenDocument
from serving.app import create_app
from serving.openai_server import local_server
from tests.conftest import in_process_client, tiny_app_settings, tiny_llama_dir

MODEL = "tiny-llama"
KEYS = ["key-of-alice-000000", "key-of-bob-11111111"]
TURNS = ["How do I read rows from a CSV file?", "And how do I write them back with a different delimiter?"]


def state(size: int) -> SlotState:
    return SlotState({"w": torch.zeros(size // 4)}, (), (), 3)


def test_the_store_expires_caps_turns_and_evicts_the_least_recent():
    now = [0.0]
    store = SessionStore(ttl_s=10, max_bytes=1000, max_turns=2, clock=lambda: now[0])
    store.save("a", Session(state(400), (GivenDocument(1, (0.0,)),), 1))
    store.save("b", Session(state(400), (), 1))
    assert store.open("a").session is not None  # a is now the more recent
    store.save("c", Session(state(400), (), 1))
    assert store.open("b").fresh is Fresh.NEW and len(store) == 2 and store.bytes == 800
    now[0] = 11.0
    assert store.open("a").fresh is Fresh.EXPIRED and len(store) == 0
    store.save("d", Session(state(400), (), 2))
    assert store.open("d").fresh is Fresh.MAX_TURNS and len(store) == 0
    store.save("huge", Session(state(2000), (), 1))
    assert len(store) == 0 and not store.drop("huge")


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_index):
    tiny = tiny_llama_dir(tmp_path_factory.mktemp("tiny") / MODEL)
    settings = tiny_app_settings(
        tiny,
        small_index.directory,
        adaptation={"candidates": 20, "max_steps": 3, "max_train_tokens": 32, "gain_budget": None},
        generator={"max_model_len": 256, "default_max_tokens": 4, "adapter_dir": str(tmp_path_factory.mktemp("a"))},
        server={"api_keys": KEYS, "sessions": {"ttl_s": 600}},
    )
    return local_server(settings)


def client(server, key: str) -> openai.AsyncOpenAI:
    return in_process_client(server, key)


async def turn(c: openai.AsyncOpenAI, text: str, session: str) -> dict:
    messages = [{"role": "user", "content": text}]
    done = await c.chat.completions.create(
        model=MODEL, messages=messages, extra_body={"adaptation": {"session": session}}
    )
    return done.model_extra["adaptation"]


async def test_a_second_turn_continues_the_first_and_conditions_on_it(server):
    alice = client(server, KEYS[0])
    first = await turn(alice, TURNS[0], "chat-1")
    assert first["session"] == {"id": "chat-1", "turn": 1, "carried_steps": 0, "new_steps": 3, "fresh": "new"}
    second = await turn(alice, TURNS[1], "chat-1")
    assert second["session"]["turn"] == 2 and second["session"]["carried_steps"] == 3
    assert second["session"]["fresh"] is None and second["adapter"] and second["steps"] == 3
    # What the method implies: the second turn's picks are SIFT's for the new prompt given the first
    # turn's documents (in the candidates, picked again only where still the most informative).
    selector = server.clients["selector"].selector
    trained = selector.select([TURNS[0]], _options(server))[0].documents
    given = [d.given() for d in trained]
    expected = selector.select([TURNS[1]], _options(server), [given])[0]
    assert [d["id"] for d in second["documents"]] == [d.id for d in expected.documents]
    assert second["sigma2"][0] == pytest.approx(expected.sigma2[0])
    alone = selector.select([TURNS[1]], _options(server))[0]
    assert expected.sigma2[0] < alone.sigma2[0]  # the first turn's documents already explain some of it


def _options(server):
    from serving.contracts import resolve

    return resolve(None, server.settings).selection


async def test_sessions_are_namespaced_by_api_key_and_deletable(server):
    alice, bob = client(server, KEYS[0]), client(server, KEYS[1])
    await turn(alice, TURNS[0], "shared-id")
    bobs = await turn(bob, TURNS[1], "shared-id")
    assert bobs["session"]["turn"] == 1 and bobs["session"]["fresh"] == "new"  # never alice's
    raw_bob = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(server)), base_url="http://test")
    headers = {"Authorization": f"Bearer {KEYS[1]}"}
    assert (await raw_bob.delete("/v1/adaptation/sessions/shared-id", headers=headers)).status_code == 200
    gone = await raw_bob.delete("/v1/adaptation/sessions/shared-id", headers=headers)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "session_not_found"
    alices = await turn(alice, TURNS[1], "shared-id")
    assert alices["session"]["turn"] == 2  # bob's delete touched only bob's
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    assert (await raw_bob.delete("/v1/adaptation/sessions/shared-id", headers=headers)).status_code == 200
    assert (await turn(alice, TURNS[0], "shared-id"))["session"]["fresh"] == "new"


async def test_an_expired_session_starts_fresh_and_leaves_nothing(server):
    alice = client(server, KEYS[0])
    await turn(alice, TURNS[0], "short")
    store = server.pipeline.trainer.sessions
    store.ttl_s = 0.2
    try:
        await asyncio.sleep(0.3)
        again = await turn(alice, TURNS[1], "short")
    finally:
        store.ttl_s = 600
    assert again["session"]["fresh"] == "expired" and again["session"]["carried_steps"] == 0
    assert all(not key.endswith("/short") or store.open(key).session.turns == 1 for key in list(store._sessions))
    assert list(server.settings.generator.adapter_dir.iterdir()) == []
    assert await server.clients["generator"].loaded_adapters() == 0


async def test_a_session_needs_training(server):
    alice = client(server, KEYS[0])
    with pytest.raises(openai.BadRequestError, match="session_without_training|needs training"):
        await alice.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": TURNS[0]}],
            extra_body={"adaptation": {"session": "s", "max_steps": 0}},
        )
    with pytest.raises(openai.BadRequestError):
        await turn(alice, TURNS[0], "has spaces")
