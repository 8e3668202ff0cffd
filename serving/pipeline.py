"""One request's flow: select -> train -> generate, as a stream of typed events.

`plan_adaptation` turns a request's `adaptation` object into an `AdaptationPlan` within the operator's
limits (or a 400 naming the limit). `Pipeline.run` then yields `Selected`, `TrainStep`s, one `Adapted`
(the report so far, when generation is about to start) and the generator's `Chunk`s, filling the job's
`AdaptationReport` as it goes. The trainer hands the adapter over as bytes (through Ray's object store
when they are on different nodes); the generator writes it on its own node, loads it, and removes it from
the engine and the disk whatever ends the request (answer, error, disconnect before or during generation).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from adapters.handle import AdapterBlob
from adapters.trainer import TrainerBusyError, TrainRequest, TrainResult, TrainStep
from selection.selector import SelectionResult, SelectOptions
from selection.stopping import StopReason
from serving.config import ContextMode, Settings
from serving.engines import Chunk, Sampling
from serving.errors import APIError, bad_request
from serving.metrics import Metrics
from serving.protocol import AdaptationOptions, AdaptationReport, DocumentRef
from serving.services import SelectQuery

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaptationPlan:
    """What adaptation a request gets, after defaults and limits."""

    enabled: bool
    max_steps: int
    selection: SelectOptions
    """How documents are picked: at most max_steps, or selection.max_picks where that is lower; with
    documents in the context, selection.max_picks (the context fills from them)."""
    learning_rate: float | None
    max_train_tokens: int | None
    time_budget_s: float | None
    progress: bool
    context: ContextMode
    context_tokens: int


def plan_adaptation(options: AdaptationOptions | None, settings: Settings) -> AdaptationPlan:
    """The request's adaptation within the server's limits; a 400 naming the limit for anything above it,
    and for `enabled: true` where the operator switched adaptation off."""
    opts = options or AdaptationOptions()
    limits, server = settings.server.limits, settings.server
    if opts.enabled and not server.adaptation_enabled:
        raise bad_request("adaptation is switched off on this server", "adaptation.enabled", "adaptation_disabled")
    for name in ("max_steps", "candidates", "time_budget_s", "max_train_tokens", "context_tokens"):
        value, cap = getattr(opts, name), getattr(limits, name)
        if value is not None and value > cap:
            raise bad_request(
                f"adaptation.{name} is {value}; this server allows at most {cap} (server.limits.{name})",
                f"adaptation.{name}",
                "limit_exceeded",
            )
    sel, tr, gen = settings.selection, settings.trainer, settings.generator

    def pick(value, default):
        return default if value is None else value

    max_steps = pick(opts.max_steps, tr.max_steps)
    context = pick(opts.context, gen.context)
    return AdaptationPlan(
        enabled=pick(opts.enabled, server.adaptation_enabled),
        max_steps=max_steps,
        selection=SelectOptions(
            n=sel.max_picks if context is ContextMode.PREPEND else min(max_steps, sel.max_picks),
            method=pick(opts.method, sel.method),
            lambda_=pick(opts.lambda_, sel.lambda_),
            alpha=pick(opts.alpha, sel.alpha),
            candidates=pick(opts.candidates, sel.candidates),
            min_gain=pick(opts.min_gain, sel.min_gain),
            step_tokens=pick(opts.max_train_tokens, tr.max_train_tokens),
        ),
        learning_rate=opts.learning_rate,
        max_train_tokens=opts.max_train_tokens,
        time_budget_s=opts.time_budget_s,
        progress=opts.progress,
        context=context,
        context_tokens=pick(opts.context_tokens, gen.context_tokens),
    )


@dataclass
class Job:
    """One request as the pipeline sees it."""

    request_id: str
    query: str
    """The text selection looks for (the last user message, or the completion prompt)."""
    prompt_ids: list[int]
    sampling: Sampling
    plan: AdaptationPlan
    report: AdaptationReport = field(default_factory=AdaptationReport)
    with_context: Callable[[list[str], int], tuple[list[int], int]] | None = None
    """For `context: prepend`: the prompt ids with as many of the given documents (in order) placed
    before the prompt as fit the token budget, and how many that was."""

    @property
    def selects(self) -> bool:
        """Whether this job runs selection: to train, or to fill its context."""
        plan = self.plan
        return plan.enabled and (plan.max_steps > 0 or plan.context is ContextMode.PREPEND)


@dataclass(frozen=True)
class Selected:
    """Selection is done: these documents will be trained on, in this order."""

    documents: list[DocumentRef]
    sigma2: list[float]
    stop_reason: StopReason


@dataclass(frozen=True)
class Adapted:
    """Adaptation is over (or was skipped); generation starts now."""

    report: AdaptationReport


Event = Selected | TrainStep | Adapted | Chunk


class _Lease:
    """The live-adapter gauge for one request: up once when its adapter arrives from the trainer, down once
    when the request is over. The adapter itself is bytes until the generator writes it on its own node, and
    the generator deletes what it wrote whatever happens, so nothing on disk depends on this request's end."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.adapter: AdapterBlob | None = None

    def take(self, adapter: AdapterBlob | None) -> None:
        self.adapter = adapter
        if adapter is not None:
            self.metrics.adapters_live(+1)

    def close(self) -> None:
        if self.adapter is not None:
            self.adapter = None
            self.metrics.adapters_live(-1)


class Pipeline:
    """select -> train -> generate over three clients (local objects or Ray Serve handles)."""

    def __init__(self, selector, trainer, generator, metrics: Metrics) -> None:
        self.selector, self.trainer, self.generator = selector, trainer, generator
        self.metrics = metrics

    def check(self, job: Job) -> None:
        """Refuse now (`Unavailable`, 503) if a part this job needs has no running replica."""
        parts = [self.generator]
        if job.selects:
            parts.append(self.selector)
        if job.plan.enabled and job.plan.max_steps > 0:
            parts.append(self.trainer)
        for client in parts:
            client.check()

    async def run(self, job: Job) -> AsyncIterator[Event]:
        lease = _Lease(self.metrics)
        try:
            async with aclosing(self._adapt(job, lease)) as events:
                async for event in events:
                    yield event
            yield Adapted(job.report)
            started = time.monotonic()
            timings = job.report.timings
            args = (job.request_id, job.prompt_ids, job.sampling, lease.adapter)
            async with aclosing(self.generator.stream("generate", *args)) as chunks:
                async for chunk in chunks:
                    timings.load_adapter += chunk.load_adapter_s
                    timings.generate = time.monotonic() - started - timings.load_adapter
                    yield chunk
            self.metrics.stage("generate", timings.generate)
        finally:
            lease.close()

    async def _adapt(self, job: Job, lease: _Lease) -> AsyncIterator[Selected | TrainStep]:
        plan, report = job.plan, job.report
        report.enabled = plan.enabled
        if not job.selects:
            report.stop_reason = StopReason.DISABLED if not plan.enabled else StopReason.MAX_STEPS
            return
        try:
            picked = await self._select(job)
        except APIError:
            raise
        except Exception:
            log.exception("selection failed")
            self._failed(report, "selection failed")
            return
        if plan.context is ContextMode.PREPEND and job.with_context is not None:
            texts = [d.text for d in picked.documents]
            before = len(job.prompt_ids)
            job.prompt_ids, used = await asyncio.to_thread(job.with_context, texts, plan.context_tokens)
            report.context = report.documents[:used]
            report.context_tokens = len(job.prompt_ids) - before
        yield Selected(report.documents, report.sigma2, picked.stop_reason)
        report.stop_reason = picked.stop_reason
        if plan.max_steps == 0:
            report.stop_reason = StopReason.MAX_STEPS
            return
        if not picked.documents:
            return
        request = TrainRequest(
            documents=[d.text for d in picked.documents],
            documents_end=picked.stop_reason,
            request_id=job.request_id,
            max_steps=plan.max_steps,
            learning_rate=plan.learning_rate,
            max_train_tokens=plan.max_train_tokens,
            time_budget_s=plan.time_budget_s,
        )
        result: TrainResult | None = None
        try:
            async with aclosing(self.trainer.stream("train", request)) as items:
                async for item in items:
                    if isinstance(item, TrainResult):
                        result = item
                        lease.take(item.adapter)
                    else:
                        yield item
        except APIError:
            raise
        except TrainerBusyError as exc:
            raise APIError(
                503,
                "Test-time training is saturated; retry shortly or send adaptation.enabled=false.",
                "server_error",
                code="trainer_busy",
                retry_after=5,
            ) from exc
        except Exception:  # training failed: the base model answers, and the response says so
            log.exception("test-time training failed")
            self._failed(report, "training failed")
            return
        if result is None:
            self._failed(report, "training ended without a result")
            return
        report.steps, report.losses, report.train_tokens = result.steps, result.losses, result.tokens
        report.timings.queue = result.queue_seconds
        report.timings.train = result.train_seconds + result.export_seconds
        report.stop_reason = result.stop_reason
        report.adapter = result.adapter is not None
        if result.stop_reason is StopReason.DIVERGED:
            report.error = "training diverged (a non-finite loss); answered by the base model"
        self.metrics.stage("train", report.timings.train)
        self.metrics.steps(result.steps)

    async def _select(self, job: Job) -> SelectionResult:
        started = time.monotonic()
        picked: SelectionResult = await self.selector.call("select", SelectQuery(job.query, job.plan.selection))
        job.report.timings.select = time.monotonic() - started
        self.metrics.stage("select", job.report.timings.select)
        job.report.documents = [DocumentRef(id=d.id, source=d.source) for d in picked.documents]
        job.report.sigma2 = picked.sigma2
        return picked

    @staticmethod
    def _failed(report: AdaptationReport, what: str) -> None:
        report.error = f"{what}; answered by the base model"
        report.stop_reason = StopReason.ERROR
        report.adapter = False
