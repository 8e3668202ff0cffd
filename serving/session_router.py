"""Sticky routing for the Trainer deployment: every call about a conversation reaches the one replica that
holds its state.

A session's training state lives in one Trainer replica's memory, so its turns must all land there. Ray
Serve's multiplexed routing only *prefers* a replica that has registered an id (the registration reaches the
routers a moment later, and a busy replica is passed over), so a later turn could land on a replica without
the state and silently start afresh. This router makes the choice a function of the key instead
(rendezvous hashing): the owner of key k among replicas R is

    owner(k) = argmax_{r in R} SHA-256(k | r)

which every router computes alike (so any number of Ingress replicas agree) and which moves only the keys
of a replica that joins or leaves (about 1/|R| of them). A busy owner is waited for (Serve's backoff), never
passed over. Calls without a key are spread by the power of two choices, preferring this node's replicas
as Serve's own router does. The key travels as the call's `multiplexed_model_id`, the one routing key a
Serve handle carries.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable

from ray.serve.request_router import LocalityMixin, PendingRequest, RequestRouter, RunningReplica

ROUTER_CLASS = f"{__name__}:SessionRouter"
"""The import path Ray Serve's `request_router_config` names (also written into the Serve config file)."""


def owner(key: str, replica_ids: Iterable[str]) -> str:
    """The id of the replica that holds `key`'s state: the highest SHA-256 of key and replica id."""
    return max(replica_ids, key=lambda r: hashlib.sha256(f"{key}|{r}".encode()).digest())


class SessionRouter(LocalityMixin, RequestRouter):
    """A session's calls go to its owner; other calls to the shorter queue of two random replicas."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            pending_request.routing_context.should_backoff = True  # a busy owner is retried after a pause
            by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
            return [[by_id[owner(pending_request.metadata.multiplexed_model_id, by_id)]]]
        ids = list(self.apply_locality_routing(pending_request))
        return [[self._replicas[i] for i in random.sample(ids, min(2, len(ids)))]]
