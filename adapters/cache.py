"""`AdapterCache`: finished adapters kept by what determines their weights, so identical training runs once.

An adapter depends only on the base model, the trainer's LoRA shape and optimizer, the documents it was
trained on in order, the options that change its weights (steps, learning rate, tokens per step, seed) and
the adapter it started from (`merge+train`); never on the prompt or the caller. `key` hashes exactly those
(SHA-256), so a request whose training inputs equal an earlier one's gets that adapter without training,
whoever sent either. Least recently used entries leave once the adapters' bytes pass the budget. Only
complete runs are stored: a run cut short by its time budget, a cancel, divergence or an error never is
(its weights depend on timing, or are not there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading

from adapters.config import TrainerConfig
from adapters.lru import ByteLRU
from adapters.spec import TrainRequest, TrainResult
from selection.stopping import StopReason

_COMPLETE = (StopReason.MAX_STEPS,)
"""Stop reasons (besides the request's own `documents_end`) of a run whose weights depend only on its inputs."""


def key(request: TrainRequest, config: TrainerConfig, model: str) -> str:
    """The training inputs' identity: equal keys train equal adapters."""
    spec = request.spec
    steps = min(spec.max_steps, len(request.documents))
    shape = config.model_dump(mode="json", exclude={"device", "max_batch", "max_waiting", "cache_bytes"})
    parts = {
        "model": model,
        "trainer": shape,
        "steps": steps,
        "learning_rate": spec.learning_rate,
        "max_train_tokens": spec.max_train_tokens,
        "seed": spec.seed,
        "start": hashlib.sha256(request.initial.weights).hexdigest() if request.initial is not None else None,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    for document in request.documents[:steps]:
        digest.update(hashlib.sha256(document.encode("utf-8")).digest())
    return digest.hexdigest()


def cacheable(request: TrainRequest, result: TrainResult) -> bool:
    """Whether `result` is a complete run of `request` (every step its inputs asked for, an adapter)."""
    return result.adapter is not None and result.stop_reason in (*_COMPLETE, request.documents_end)


def _adapter_bytes(result: TrainResult) -> int:
    return len(result.adapter.weights) if result.adapter is not None else 0


class AdapterCache:
    """Finished training results by `key`, within `max_bytes` of adapter weights (thread-safe)."""

    def __init__(self, max_bytes: int) -> None:
        self._entries: ByteLRU[TrainResult] = ByteLRU(max_bytes, _adapter_bytes)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._entries.bytes

    def get(self, request: TrainRequest, name: str) -> TrainResult | None:
        """The cached result for `name` (a `key`), as `request` would have ended: no queue or training time,
        `cached` set, the request's own stop reason when it ran out of documents."""
        with self._lock:
            found = self._entries.get(name)
        if found is None:
            return None
        ran_out = found.steps >= len(request.documents)
        reason = request.documents_end if ran_out else StopReason.MAX_STEPS
        return dataclasses.replace(
            found, stop_reason=reason, cached=True, train_seconds=0.0, export_seconds=0.0, queue_seconds=0.0
        )

    def put(self, name: str, result: TrainResult) -> None:
        """Keep `result` (its adapter's bytes count against the budget); evict the least recently used."""
        if _adapter_bytes(result) == 0:
            return
        with self._lock:
            self._entries.put(name, result)
