"""One request's flow: [merge] -> select -> train -> generate, as a stream of immutable events (`serving.events`).

A `Job` is a request as the pipeline sees it: the resolved `AdaptationSpec`, the tokenised prompt, and (for
in-context retrieval) the request's prompt `Renderer`, which `fit` calls off the event loop. The trainer
hands the adapter over as bytes (through Ray's object store when they are on different nodes); it travels
in the pipeline's own frame to the generator, which writes it on its own node, loads it, and removes it
from the engine and the disk whatever ends the request (answer, error, disconnect before or during
generation).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from adapters.handle import AdapterBlob
from adapters.spec import TrainRequest, TrainResult, TrainStep
from adapters.trainer import TrainerBusyError
from selection.selector import GivenDocument, SelectionResult
from selection.stopping import StopReason
from serving.clients import GeneratorAPI, SelectorAPI, TrainerAPI
from serving.context import fit
from serving.contracts import AdaptationSpec, GenerateRequest, MergeQuery, Sampling, SelectQuery
from serving.errors import APIError
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
from serving.metrics import Metrics
from serving.protocol import DocumentRef

log = logging.getLogger(__name__)

SNIPPET_CHARS = 200
"""The start of a picked document that the `selected` progress event shows."""

Renderer = Callable[[Sequence[str]], list[int]]
"""The request's prompt ids with the given documents placed before the prompt."""


@dataclass(frozen=True)
class Job:
    """One request as the pipeline sees it."""

    request_id: str
    query: str
    """The text selection looks for (the last user message, or the completion prompt)."""
    prompt_ids: tuple[int, ...]
    sampling: Sampling
    spec: AdaptationSpec
    render: Renderer | None = None
    """For in-context retrieval: renders the prompt with documents (set when `spec.context_budget` > 0)."""


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
    """select -> train -> generate over the three services (local objects or Ray Serve handles)."""

    def __init__(self, selector: SelectorAPI, trainer: TrainerAPI, generator: GeneratorAPI, metrics: Metrics) -> None:
        self.selector, self.trainer, self.generator = selector, trainer, generator
        self.metrics = metrics

    def check(self, job: Job) -> None:
        """Refuse now (`Unavailable`, 503) if a part this job needs has no running replica."""
        self.generator.check()
        if job.spec.selects or job.spec.merges:
            self.selector.check()
        if job.spec.trains:
            self.trainer.check()

    async def run(self, job: Job) -> AsyncGenerator[Event]:
        lease = _Lease(self.metrics)
        prompt_ids = job.prompt_ids
        try:
            async with aclosing(self._adapt(job, lease)) as events:
                async for event in events:
                    if isinstance(event, ContextFilled):
                        prompt_ids = event.prompt_ids
                    yield event
            yield GenerationStarted()
            request = GenerateRequest(job.request_id, prompt_ids, job.sampling, lease.adapter)
            async with aclosing(self._generate(request)) as generated:
                async for event in generated:
                    yield event
        finally:
            lease.close()

    async def _generate(self, request: GenerateRequest) -> AsyncGenerator[Generated]:
        started, loading = time.monotonic(), 0.0
        generate_seconds = 0.0
        async with aclosing(self.generator.generate(request)) as chunks:
            async for chunk in chunks:
                loading += chunk.load_adapter_s
                generate_seconds = time.monotonic() - started - loading
                yield Generated(chunk, generate_seconds)
        self.metrics.stage("generate", generate_seconds)

    async def _adapt(self, job: Job, lease: _Lease) -> AsyncGenerator[Event]:
        spec = job.spec
        if not spec.merges and not spec.selects:
            yield AdaptationSkipped(StopReason.DISABLED if not spec.enabled else StopReason.MAX_STEPS)
            return
        given: tuple[GivenDocument, ...] = ()
        if spec.session is not None:
            turn = await self.trainer.session(spec.session.key)
            given = turn.documents
            yield SessionOpened(spec.session.id, turn.turn, turn.steps, turn.fresh)
        initial: AdapterBlob | None = None
        if spec.merges:
            try:
                initial, merged = await self._merge(job)
            except APIError:
                raise
            except Exception:
                log.exception("merging failed")
                yield AdaptationFailed("merging failed; answered by the base model")
                return
            yield merged
            if not spec.trains:
                lease.take(initial)
        if not spec.selects:
            yield AdaptationSkipped(StopReason.MAX_STEPS)
            return
        try:
            picked, seconds = await self._select(job, given)
        except APIError:
            raise
        except Exception:
            log.exception("selection failed")
            yield AdaptationFailed("selection failed; answered by the base model")
            return
        documents = tuple(DocumentRef(id=d.id, source=d.source) for d in picked.documents)
        snippets = tuple(d.text[:SNIPPET_CHARS] for d in picked.documents)
        yield Selected(documents, tuple(picked.sigma2), picked.stop_reason, seconds, snippets)
        if spec.context_budget and job.render is not None:
            texts = [d.text for d in picked.documents]
            ids, used = await asyncio.to_thread(fit, texts, spec.context.tokens, job.render, len(job.prompt_ids))
            yield ContextFilled(used, tuple(ids), len(ids) - len(job.prompt_ids))
        if not spec.trains:
            yield AdaptationSkipped(StopReason.MAX_STEPS)
            return
        if not picked.documents and not given:
            lease.take(initial)  # merge+train with nothing to train on: the merge answers
            return
        request = TrainRequest(
            documents=tuple(d.text for d in picked.documents),
            spec=spec.training,
            documents_end=picked.stop_reason,
            request_id=job.request_id,
            initial=initial,
            session=spec.session.key if spec.session is not None else None,
            picked=tuple(d.given() for d in picked.documents),
        )
        async with aclosing(self._train(request, lease)) as events:
            async for event in events:
                yield event

    async def _merge(self, job: Job) -> tuple[AdapterBlob | None, Merged]:
        started = time.monotonic()
        merged = await self.selector.merge(MergeQuery(job.query, job.spec.merge))
        seconds = time.monotonic() - started
        self.metrics.stage("merge", seconds)
        return merged.adapter, Merged(merged.experts, merged.rank, merged.relative_error, seconds)

    async def _select(self, job: Job, given: tuple[GivenDocument, ...] = ()) -> tuple[SelectionResult, float]:
        started = time.monotonic()
        picked = await self.selector.select(SelectQuery(job.query, job.spec.selection, given))
        seconds = time.monotonic() - started
        self.metrics.stage("select", seconds)
        return picked, seconds

    async def _train(
        self, request: TrainRequest, lease: _Lease
    ) -> AsyncGenerator[TrainStep | Trained | AdaptationFailed]:
        result: TrainResult | None = None
        try:
            async with aclosing(self.trainer.train(request)) as items:
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
            yield AdaptationFailed("training failed; answered by the base model")
            return
        if result is None:
            yield AdaptationFailed("training ended without a result; answered by the base model")
            return
        diverged = result.stop_reason is StopReason.DIVERGED
        seconds = result.train_seconds + result.export_seconds
        yield Trained(
            steps=result.steps,
            losses=result.losses,
            tokens=result.tokens,
            stop_reason=result.stop_reason,
            adapter=result.adapter is not None,
            queue_seconds=result.queue_seconds,
            train_seconds=seconds,
            cached=result.cached,
            error="training diverged (a non-finite loss); answered by the base model" if diverged else None,
        )
        self.metrics.adapter_cache(hit=result.cached)
        if not result.cached:
            self.metrics.stage("train", seconds)
            self.metrics.steps(result.steps)
