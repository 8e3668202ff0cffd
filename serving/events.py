"""What happens to one request, in order: the immutable events the pipeline yields.

    no adaptation:   AdaptationSkipped -> GenerationStarted -> Generated*
    merge:           Merged -> [Selected -> ContextFilled] -> AdaptationSkipped -> GenerationStarted -> ...
    selection:       [SessionOpened] [Merged (merge+train)] -> Selected -> [ContextFilled]
                     -> (TrainStep* -> Trained | AdaptationFailed
                         | AdaptationSkipped (max_steps 0: context only)
                         | nothing (no document picked))
                     -> GenerationStarted -> Generated*
    merge or selection fails: AdaptationFailed -> GenerationStarted -> Generated*

`AdaptationFailed` means the base model answers, and the report says why. The format layer folds these
into the response and its `adaptation` report (`serving.report`); nothing downstream reads state the
pipeline mutated.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters.merge import ExpertWeight
from adapters.spec import TrainStep
from selection.stopping import StopReason
from serving.contracts import Chunk
from serving.protocol import DocumentRef


@dataclass(frozen=True)
class Merged:
    """The index's experts were merged for this prompt: these experts and weights, the merged adapter's rank
    and its truncation error (the adapter travels with the request, not in the event)."""

    experts: tuple[ExpertWeight, ...]
    rank: int
    relative_error: float
    seconds: float


@dataclass(frozen=True)
class SessionOpened:
    """This request is turn `turn` of conversation `id`: its adapter starts from `carried_steps` steps of
    earlier turns (0 and `fresh` set when the session starts over: new, expired or max_turns)."""

    id: str
    turn: int
    carried_steps: int
    fresh: str | None


@dataclass(frozen=True)
class Selected:
    """Selection is done: these documents, in this order, with the prompt's variance after each pick."""

    documents: tuple[DocumentRef, ...]
    sigma2: tuple[float, ...]
    stop_reason: StopReason
    seconds: float
    snippets: tuple[str, ...] = ()
    """The start of each document's text (for the `selected` progress event)."""


@dataclass(frozen=True)
class ContextFilled:
    """The first `documents` picks were placed before the prompt; `prompt_ids` is what generation gets."""

    documents: int
    prompt_ids: tuple[int, ...]
    added_tokens: int


@dataclass(frozen=True)
class Trained:
    """Training is over: `adapter` says whether an adapter came back (it travels with the request, not in
    the event)."""

    steps: int
    losses: tuple[float, ...]
    tokens: int
    stop_reason: StopReason
    adapter: bool
    queue_seconds: float
    train_seconds: float
    cached: bool = False
    """The adapter came from the cache of identical training: no step ran for this request."""
    error: str | None = None
    """Set when the adapter was discarded (training diverged): the base model answers."""


@dataclass(frozen=True)
class AdaptationFailed:
    """Selection or training failed; the base model answers, and the response says so."""

    error: str


@dataclass(frozen=True)
class AdaptationSkipped:
    """No selection runs for this request (adaptation off, or nothing to train and no context to fill)."""

    stop_reason: StopReason


@dataclass(frozen=True)
class GenerationStarted:
    """Adaptation is over (or was skipped); generation starts now."""


@dataclass(frozen=True)
class Generated:
    """A chunk of the answer; `generate_seconds` is the generation time so far (adapter loading excluded)."""

    chunk: Chunk
    generate_seconds: float


Event = (
    SessionOpened
    | Merged
    | Selected
    | ContextFilled
    | TrainStep
    | Trained
    | AdaptationFailed
    | AdaptationSkipped
    | GenerationStarted
    | Generated
)
