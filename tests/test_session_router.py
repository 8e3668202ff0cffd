"""Rendezvous hashing gives each session one owner, spreads sessions evenly, and moves only the sessions of a
replica that joins or leaves."""

from __future__ import annotations

from collections import Counter

from serving.session_router import owner

KEYS = [f"caller/chat-{i}" for i in range(2000)]
REPLICAS = ["a1b2", "c3d4", "e5f6", "g7h8"]


def test_the_owner_is_a_function_of_the_key_and_the_replica_set():
    assert [owner(k, REPLICAS) for k in KEYS] == [owner(k, list(reversed(REPLICAS))) for k in KEYS]
    assert len({owner(k, REPLICAS) for k in KEYS[:50]}) > 1


def test_sessions_spread_evenly():
    counts = Counter(owner(k, REPLICAS) for k in KEYS)
    assert set(counts) == set(REPLICAS)
    assert all(400 <= n <= 600 for n in counts.values()), counts


def test_only_a_leaving_or_joining_replicas_sessions_move():
    before = {k: owner(k, REPLICAS) for k in KEYS}
    after_leave = {k: owner(k, REPLICAS[:-1]) for k in KEYS}
    moved = {k for k in KEYS if before[k] != after_leave[k]}
    assert moved == {k for k in KEYS if before[k] == REPLICAS[-1]}
    after_join = {k: owner(k, [*REPLICAS, "i9j0"]) for k in KEYS}
    moved = {k for k in KEYS if before[k] != after_join[k]}
    assert all(after_join[k] == "i9j0" for k in moved) and 300 <= len(moved) <= 500
