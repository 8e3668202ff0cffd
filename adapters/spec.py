"""What crosses the trainer's boundary: a request to train (`TrainRequest` with its resolved `TrainSpec`),
the progress it reports (`TrainStep`) and what it hands back (`TrainResult`).

Plain dataclasses (no tensors, no model), so the serving layer and Ray's serialisation use them without
loading a model. A `TrainSpec`
is fully resolved: every number is the one the trainer uses; defaults and the server's limits were applied
once, by whoever built it (the server's `resolve`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from selection.selector import GivenDocument
from selection.stopping import StopReason

if TYPE_CHECKING:
    from adapters.handle import AdapterBlob
    from adapters.state import SlotState


@dataclass(frozen=True)
class TrainSpec:
    """How one request's adapter is trained."""

    max_steps: int
    """Most optimizer steps (one per picked document)."""
    learning_rate: float
    max_train_tokens: int
    """Each document is truncated to this many tokens."""
    time_budget_s: float | None
    """Wall-clock budget for training (None: no budget)."""
    seed: int
    """Seeds the adapter's initialisation."""

    def __post_init__(self) -> None:
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.max_train_tokens < 2:
            raise ValueError(f"max_train_tokens must be >= 2, got {self.max_train_tokens}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be positive, got {self.time_budget_s}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")


@dataclass(frozen=True)
class TrainRequest:
    """What to train on for one prompt, and how."""

    documents: tuple[str, ...]
    """Document texts in pick order (repeats allowed: each occurrence is one step)."""
    spec: TrainSpec
    documents_end: StopReason = StopReason.MAX_STEPS
    """Why the document list ends where it does (selection's stop reason): reported when all are trained on."""
    request_id: str = ""
    """The serving request this training is for (in log lines)."""
    initial: AdapterBlob | None = None
    """Training starts from this adapter (a merge of experts) instead of a fresh one."""
    resume: SlotState | None = None
    """Training continues this saved state (a conversation's adapter and optimizer) instead of starting."""
    keep_state: bool = False
    """Hand the final state back in the result (`TrainResult.state`), to resume in a later turn."""
    session: str | None = None
    """The conversation this is a turn of (its namespaced key): the Trainer's service resumes the session's
    state and keeps the new one."""
    picked: tuple[GivenDocument, ...] = ()
    """The documents' index rows and embeddings (what the session records for the next turn's selection)."""

    def __post_init__(self) -> None:
        if isinstance(self.documents, str) or any(not isinstance(d, str) for d in self.documents):
            raise ValueError("documents must be a sequence of strings")
        object.__setattr__(self, "documents", tuple(self.documents))


@dataclass(frozen=True)
class TrainStep:
    """Progress: optimizer step `step` (1-based) is done, with this training loss."""

    step: int
    loss: float


@dataclass(frozen=True)
class TrainResult:
    """The adapter (None when no step was taken, or the request was cancelled or diverged) and what it cost."""

    adapter: AdapterBlob | None
    steps: int
    stop_reason: StopReason
    """The request's `documents_end` when every document was trained on, else max_steps, time_budget,
    cancelled or diverged."""
    losses: tuple[float, ...] = field(default_factory=tuple)
    """One finite loss per step taken."""
    tokens: int = 0
    """Tokens trained on (the sum of the steps' sequence lengths)."""
    train_seconds: float = 0.0
    export_seconds: float = 0.0
    queue_seconds: float = 0.0
    cached: bool = False
    """The adapter came from the cache of identical training (`adapters.cache`): no step ran for it."""
    state: SlotState | None = None
    """The final training state, when the request asked to keep it and was not cancelled or diverged."""
