"""The `adaptation` report of a response, folded from the pipeline's events (`serving.events`).

`ReportFold.add` takes the events in order; `report()` is the report so far, a fresh `AdaptationReport`
each time (the opening stream chunk carries the report as it stands when generation starts, the last chunk
and the whole response the final one).
"""

from __future__ import annotations

from adapters.spec import TrainStep
from selection.stopping import StopReason
from serving.config import AdaptationMode
from serving.events import (
    AdaptationFailed,
    AdaptationSkipped,
    ContextFilled,
    Event,
    Generated,
    GenerationStarted,
    Merged,
    Selected,
    SessionOpened,
    Trained,
)
from serving.protocol import AdaptationReport, ExpertRef, MergeReport, SessionReport


class ReportFold:
    """What adaptation did for one request, as its events arrive."""

    def __init__(self, enabled: bool, mode: AdaptationMode = AdaptationMode.TRAIN) -> None:
        self._report = AdaptationReport(enabled=enabled, mode=mode)

    def report(self) -> AdaptationReport:
        return self._report.model_copy(deep=True)

    @property
    def context_tokens(self) -> int:
        """Prompt tokens the documents placed before the prompt added so far."""
        return self._report.context_tokens

    def add(self, event: Event) -> None:
        r = self._report
        match event:
            case AdaptationSkipped(stop_reason=reason):
                r.stop_reason = reason
            case SessionOpened():
                r.session = SessionReport(
                    id=event.id, turn=event.turn, carried_steps=event.carried_steps, fresh=event.fresh
                )
            case Merged():
                r.merge = merge_report(event)
                r.adapter = bool(event.experts)
                r.timings.merge = event.seconds
            case Selected():
                r.documents = list(event.documents)
                r.sigma2 = list(event.sigma2)
                r.stop_reason = event.stop_reason
                r.timings.select = event.seconds
            case ContextFilled():
                r.context = r.documents[: event.documents]
                r.context_tokens = event.added_tokens
            case Trained():
                r.steps, r.losses, r.train_tokens = event.steps, list(event.losses), event.tokens
                r.timings.queue, r.timings.train = event.queue_seconds, event.train_seconds
                r.stop_reason, r.adapter, r.error = event.stop_reason, event.adapter, event.error
                r.cached = event.cached
                if r.session is not None:
                    r.session.new_steps = event.steps
            case AdaptationFailed(error=error):
                r.error, r.stop_reason, r.adapter = error, StopReason.ERROR, False
            case Generated():
                r.timings.load_adapter += event.chunk.load_adapter_s
                r.timings.generate = event.generate_seconds
            case TrainStep() | GenerationStarted():
                pass


def merge_report(event: Merged) -> MergeReport:
    """A merge as responses report it."""
    experts = [ExpertRef(expert=e.expert, weight=e.weight) for e in event.experts]
    return MergeReport(experts=experts, rank=event.rank, relative_error=event.relative_error)
