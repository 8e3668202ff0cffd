"""The format layer's two ways to answer from the pipeline's events: one whole response (`collect`) or a
server-sent event stream (`sse`). Both fold the events into the `adaptation` report (`ReportFold`) and the
generated output (`Output`), and let the route's format (`ChatFormat`, `CompletionFormat`) say how a
response and a chunk look.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from adapters.spec import TrainStep
from serving.events import Event, Generated, GenerationStarted, Merged, Selected
from serving.formats import ChatFormat, CompletionFormat, Output
from serving.pipeline import Job
from serving.protocol import (
    ChatCompletionResponse,
    CompletionResponse,
    MergedEvent,
    PickedRef,
    SelectedEvent,
    TrainingEvent,
    UsageInfo,
)
from serving.report import ReportFold, merge_report
from serving.sse import sse_data, with_heartbeat


async def collect(
    events: AsyncGenerator[Event], job: Job, fmt: ChatFormat | CompletionFormat
) -> ChatCompletionResponse | CompletionResponse:
    """The whole response, once the pipeline is done."""
    output, fold = Output.of(job.sampling.n), ReportFold(job.spec.enabled, job.spec.mode)
    async with aclosing(events) as stream:
        async for event in stream:
            fold.add(event)
            if isinstance(event, Generated):
                output.add(event.chunk)
    return fmt.response(output, fold.report())


async def sse(
    events: AsyncGenerator[Event],
    job: Job,
    fmt: ChatFormat | CompletionFormat,
    heartbeat_s: float,
    include_usage: bool,
    continuous_usage: bool,
) -> AsyncGenerator[str]:
    """The one SSE emitter: progress (when asked for), an opening chunk per choice, token chunks, usage,
    [DONE]; an SSE comment whenever the stream would otherwise stay silent for `heartbeat_s`. With
    `continuous_usage` (vLLM's continuous_usage_stats) the opening and token chunks carry usage so far."""
    output, fold = Output.of(job.sampling.n), ReportFold(job.spec.enabled, job.spec.mode)
    progress = job.spec.progress

    def usage() -> UsageInfo:
        return UsageInfo.of(fmt.prompt_tokens(fold.context_tokens), fmt.completion_tokens(output))

    async for event in with_heartbeat(events, heartbeat_s):
        if event is None:
            yield ": keep-alive\n\n"
            continue
        fold.add(event)
        if isinstance(event, Merged) and progress:
            yield sse_data(fmt.chunk(adaptation=MergedEvent(**merge_report(event).model_dump())))
        elif isinstance(event, Selected) and progress:
            documents = [
                PickedRef(id=d.id, source=d.source, snippet=snippet)
                for d, snippet in zip(event.documents, event.snippets, strict=True)
            ]
            selected = SelectedEvent(documents=documents, sigma2=list(event.sigma2), stop_reason=event.stop_reason)
            yield sse_data(fmt.chunk(adaptation=selected))
        elif isinstance(event, TrainStep) and progress:
            yield sse_data(fmt.chunk(adaptation=TrainingEvent(step=event.step, loss=event.loss)))
        elif isinstance(event, GenerationStarted):
            opening = fmt.opening(fold.report())
            opening.usage = usage() if continuous_usage else None
            yield sse_data(opening)
        elif isinstance(event, Generated):
            first = output.add(event.chunk)
            chunk = fmt.delta(event.chunk, output, first, fold.report() if output.done else None)
            if chunk is not None:
                chunk.usage = usage() if continuous_usage else None
                yield sse_data(chunk)
    if include_usage:
        yield sse_data(fmt.chunk(usage=usage()))
    yield "data: [DONE]\n\n"
