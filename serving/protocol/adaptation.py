"""The `adaptation` extension: the request object, the report in every response, and the progress events
of a stream."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from selection.rules import Method
from selection.stopping import MIN_LAMBDA, StopReason
from serving.config import AdaptationMode, ContextMode
from serving.protocol.base import _Strict


class AdaptationOptions(_Strict):
    """Per-request control of test-time training, sent as `extra_body={"adaptation": {...}}`.

    Every field falls back to the server's configuration; values above the server's limits are refused.
    """

    enabled: bool | None = None
    mode: AdaptationMode | None = Field(
        None, description="train, merge (the index's experts, no training) or merge+train (training starts there)"
    )
    max_steps: int | None = Field(None, ge=0)
    min_gain: float | None = Field(
        None, ge=0, description="stop once a step removes less than this share of uncertainty per 1,000 tokens"
    )
    alpha: float | None = Field(None, gt=0, description="the paper's rule: stop once sigma_n > 1/(alpha n)")
    gain_budget: float | None = Field(
        None, ge=0, description="the gain-budget rule: train on the first n picks while V log(1 + 1/n) >= this"
    )
    lambda_: float | None = Field(None, ge=MIN_LAMBDA, alias="lambda")
    candidates: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0, le=1)
    max_train_tokens: int | None = Field(None, ge=2)
    time_budget_s: float | None = Field(None, gt=0)
    method: Method | None = None
    context: ContextMode | None = Field(
        None, description="prepend: the selected documents also go before the prompt (max_steps 0: only there)"
    )
    context_tokens: int | None = Field(None, ge=1, description="most prompt tokens the prepended documents add")
    merge_beta: float | None = Field(None, gt=0, le=10, description="merging's kernel width")
    merge_threshold: float | None = Field(None, ge=0, lt=1, description="merging's tau: lighter experts are left out")
    merge_experts: int | None = Field(None, ge=1, description="most experts merged")
    session: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[\x21-\x7e]+$",
        description="a conversation's id (printable, no spaces): the adapter trained in its earlier turns carries "
        "over, and selection conditions on what it was trained on",
    )
    progress: bool = Field(False, description="stream `merged`, `selected` and per-step events before the first token")


class DocumentRef(BaseModel):
    """A corpus document, as responses and events name it (immutable)."""

    model_config = ConfigDict(frozen=True)

    id: str
    source: str


class PickedRef(DocumentRef):
    """A picked document in the `selected` progress event: its reference and the start of its text."""

    snippet: str = Field(description="the document's first characters (at most 200), for display")


class ExpertRef(BaseModel):
    """An expert adapter of the index in a merge, and its weight (a merge's weights sum to 1)."""

    model_config = ConfigDict(frozen=True)

    expert: int
    weight: float


class MergeReport(BaseModel):
    """What merging did: the experts and their weights, the merged adapter's rank, and the relative
    Frobenius error of cutting it to that rank (0 when exact)."""

    experts: list[ExpertRef] = Field(default_factory=list)
    rank: int = 0
    relative_error: float = 0.0


class SessionReport(BaseModel):
    """A turn of a conversation (`adaptation.session`): which turn, what carried over, what was new."""

    id: str
    turn: int = Field(description="1 for a session's first turn")
    carried_steps: int = Field(0, description="training steps of earlier turns the adapter started from")
    new_steps: int = Field(0, description="steps this turn trained")
    fresh: str | None = Field(
        None, description="why this turn started afresh: new (unknown id), expired, or max_turns; null: continued"
    )


class SessionDeleted(BaseModel):
    """The answer to `DELETE /v1/adaptation/sessions/{id}`."""

    id: str
    object: Literal["adaptation.session"] = "adaptation.session"
    deleted: bool = True


class StageTimings(BaseModel):
    """Seconds spent in each stage of the request."""

    queue: float = 0.0
    merge: float = 0.0
    select: float = 0.0
    train: float = 0.0
    load_adapter: float = 0.0
    generate: float = 0.0


class AdaptationReport(BaseModel):
    """What test-time training did for this response (top-level `adaptation` object)."""

    enabled: bool = False
    mode: AdaptationMode = AdaptationMode.TRAIN
    merge: MergeReport | None = Field(None, description="set when the adapter started from a merge of experts")
    session: SessionReport | None = Field(None, description="set for a turn of a conversation (adaptation.session)")
    documents: list[DocumentRef] = Field(default_factory=list)
    sigma2: list[float] = Field(default_factory=list)
    steps: int = 0
    train_tokens: int = Field(0, description="tokens trained on, summed over the steps (to bill and cap training)")
    stop_reason: StopReason = StopReason.DISABLED
    adapter: bool = False
    cached: bool = Field(
        False, description="the adapter came from the cache of identical training (same documents and options)"
    )
    losses: list[float] = Field(default_factory=list)
    context: list[DocumentRef] = Field(
        default_factory=list, description="documents placed before the prompt (context: prepend), in order"
    )
    context_tokens: int = Field(0, description="prompt tokens the prepended documents added")
    timings: StageTimings = Field(default_factory=StageTimings)
    error: str | None = None


class MergedEvent(MergeReport):
    """Progress event: the experts merged for this prompt (merge and merge+train)."""

    stage: Literal["merged"] = "merged"


class SelectedEvent(BaseModel):
    """Progress event: the documents selection picked, before training starts."""

    stage: Literal["selected"] = "selected"
    documents: list[PickedRef]
    sigma2: list[float]
    stop_reason: StopReason


class TrainingEvent(BaseModel):
    """Progress event: one training step is done."""

    stage: Literal["training"] = "training"
    step: int
    loss: float


ProgressEvent = Annotated[MergedEvent | SelectedEvent | TrainingEvent, Field(discriminator="stage")]
