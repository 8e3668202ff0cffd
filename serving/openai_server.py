"""The OpenAI routes' logic: validate, run the pipeline, and shape its events into OpenAI responses.

`OpenAIServer` is a plain object over three clients (Selector, Trainer, Generator; local objects or Ray
Serve handles). It knows the model's tokenizer, chat template and context length, and turns the
pipeline's events into response models, or into server-sent events through one emitter (`_sse`) that
chat and completions share; each route only says how its chunks look (`ChatFormat`, `CompletionFormat`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from pydantic import BaseModel

from adapters.trainer import TrainStep
from serving.clients import LocalClient
from serving.config import Settings
from serving.engines import Chunk, SamplingDefaults
from serving.engines.base import TokenLogprobs
from serving.errors import APIError, bad_request
from serving.metrics import Metrics
from serving.pipeline import Adapted, Job, Pipeline, Selected, plan_adaptation
from serving.protocol import (
    AdaptationReport,
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    HealthResponse,
    ModelCard,
    ModelList,
    SelectedEvent,
    TopLogprob,
    TrainingEvent,
    UsageInfo,
    new_id,
    now,
)

log = logging.getLogger(__name__)

_READY_TIMEOUT_S = 5.0


@dataclass
class ChoiceOutput:
    """What one choice generated so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Output:
    """All choices of one request, accumulated from the generator's chunks."""

    choices: list[ChoiceOutput]
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @classmethod
    def of(cls, n: int) -> Output:
        return cls([ChoiceOutput() for _ in range(n)])

    def add(self, chunk: Chunk) -> bool:
        """Record a chunk; True when it is the first of its choice."""
        choice = self.choices[chunk.index]
        first = not choice.token_ids
        choice.text += chunk.text
        choice.token_ids += chunk.token_ids
        choice.logprobs += chunk.logprobs or []
        choice.finish_reason = chunk.finish_reason or choice.finish_reason
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs = chunk.prompt_logprobs
        return first

    @property
    def done(self) -> bool:
        return all(c.finish_reason for c in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)


async def with_heartbeat(events: AsyncIterator, interval: float) -> AsyncIterator:
    """The events, with None whenever `interval` seconds pass without one (time for an SSE comment)."""
    iterator = events.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            finished, pending = pending, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await iterator.aclose()  # type: ignore[attr-defined]


def _data(model: BaseModel) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


class _Format:
    """How one route's responses and stream chunks look."""

    def __init__(self, server: OpenAIServer, job: Job) -> None:
        self.server, self.job = server, job
        self.id = new_id(self.prefix, job.request_id)
        self.created = now()

    prefix = ""

    def piece(self, token: int) -> str:
        return self.server.tokenizer.decode([token])


class ChatFormat(_Format):
    prefix = "chatcmpl"

    def __init__(self, server: OpenAIServer, job: Job, req: ChatCompletionRequest) -> None:
        super().__init__(server, job)
        self.top = (req.top_logprobs or 0) if req.logprobs else None

    def chunk(self, choices: list[ChatStreamChoice] | None = None, **extra) -> ChatCompletionChunk:
        model = self.server.model_name
        return ChatCompletionChunk(id=self.id, created=self.created, model=model, choices=choices or [], **extra)

    def opening(self, report: AdaptationReport) -> ChatCompletionChunk:
        n = self.job.sampling.n
        choices = [ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(n)]
        return self.chunk(choices, adaptation=report)

    def delta(self, chunk: Chunk, output: Output, first: bool) -> ChatCompletionChunk | None:
        if not (chunk.text or chunk.finish_reason or chunk.logprobs):
            return None
        logprobs = self.logprobs(chunk.token_ids, chunk.logprobs or []) if self.top is not None else None
        choice = ChatStreamChoice(
            index=chunk.index,
            delta=DeltaMessage(content=chunk.text),
            logprobs=logprobs,
            finish_reason=chunk.finish_reason,
        )
        return self.chunk([choice], adaptation=self.job.report if output.done else None)

    def logprobs(self, token_ids: list[int], entries: list[TokenLogprobs]) -> ChatLogprobs:
        content = []
        for token, entry in zip(token_ids, entries, strict=False):
            piece = self.piece(token)
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])[: self.top]
            top = [TopLogprob(token=self.piece(t), logprob=v, bytes=list(self.piece(t).encode())) for t, v in ranked]
            content.append(
                ChatTokenLogprob(token=piece, logprob=entry[token], bytes=list(piece.encode()), top_logprobs=top)
            )
        return ChatLogprobs(content=content)

    def response(self, output: Output, prompt_tokens: int) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=c.text),
                logprobs=self.logprobs(c.token_ids, c.logprobs) if self.top is not None else None,
                finish_reason=c.finish_reason or "stop",
            )
            for i, c in enumerate(output.choices)
        ]
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.server.model_name,
            choices=choices,
            usage=UsageInfo.of(prompt_tokens, output.completion_tokens),
            adaptation=self.job.report,
        )


class CompletionFormat(_Format):
    prefix = "cmpl"

    def __init__(self, server: OpenAIServer, job: Job, req: CompletionRequest) -> None:
        super().__init__(server, job)
        self.req = req
        self.scoring = req.max_tokens == 0  # echo the prompt with its logprobs, generate nothing

    def chunk(self, choices: list[CompletionChoice] | None = None, **extra) -> CompletionChunk:
        model = self.server.model_name
        return CompletionChunk(id=self.id, created=self.created, model=model, choices=choices or [], **extra)

    def opening(self, report: AdaptationReport) -> CompletionChunk:
        choices = [CompletionChoice(index=i, text="") for i in range(self.job.sampling.n)]
        return self.chunk(choices, adaptation=report)

    def _entries(self, output: Output, token_ids: list[int], logprobs: list[TokenLogprobs], first: bool):
        """(token, logprobs) pairs to report: the prompt's first when echoing, then the generated ones."""
        entries: list[tuple[int, TokenLogprobs | None]] = []
        if first and self.req.echo:
            prompt_lp = output.prompt_logprobs or [None] * len(self.job.prompt_ids)
            entries += list(zip(self.job.prompt_ids, prompt_lp, strict=False))
        if not self.scoring:
            entries += list(zip(token_ids, logprobs or [None] * len(token_ids), strict=False))
        return entries

    def _text(self, text: str, first: bool) -> str:
        generated = "" if self.scoring else text
        return (self.req.prompt + generated) if first and self.req.echo else generated  # type: ignore[operator]

    def logprobs(self, entries: list[tuple[int, TokenLogprobs | None]], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for token, entry in entries:
            piece = self.piece(token)
            out.tokens.append(piece)
            out.text_offset.append(offset)
            offset += len(piece)
            out.token_logprobs.append(None if entry is None else entry[token])
            out.top_logprobs.append(None if entry is None else {self.piece(t): v for t, v in entry.items()})
        return out

    def delta(self, chunk: Chunk, output: Output, first: bool) -> CompletionChunk | None:
        text = self._text(chunk.text, first)
        if not (text or chunk.finish_reason or (chunk.logprobs and not self.scoring)):
            return None
        logprobs = None
        if self.req.logprobs is not None:
            offset = len(output.choices[chunk.index].text) - len(chunk.text) if not first else 0
            logprobs = self.logprobs(self._entries(output, chunk.token_ids, chunk.logprobs or [], first), offset)
        finish = ("length" if self.scoring else chunk.finish_reason) if chunk.finish_reason else None
        choice = CompletionChoice(index=chunk.index, text=text, logprobs=logprobs, finish_reason=finish)
        return self.chunk([choice], adaptation=self.job.report if output.done else None)

    def response(self, output: Output, prompt_tokens: int) -> CompletionResponse:
        choices = []
        for i, c in enumerate(output.choices):
            logprobs = None
            if self.req.logprobs is not None:
                logprobs = self.logprobs(self._entries(output, c.token_ids, c.logprobs, True), 0)
            finish = "length" if self.scoring else (c.finish_reason or "stop")
            choices.append(
                CompletionChoice(index=i, text=self._text(c.text, True), logprobs=logprobs, finish_reason=finish)
            )
        completion_tokens = 0 if self.scoring else output.completion_tokens
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.server.model_name,
            choices=choices,
            usage=UsageInfo.of(prompt_tokens, completion_tokens),
            adaptation=self.job.report,
        )


class OpenAIServer:
    """OpenAI routes' logic over the Selector, Trainer and Generator clients."""

    def __init__(
        self,
        settings: Settings,
        tokenizer,
        selector,
        trainer,
        generator,
        max_model_len: int,
        model_name: str,
        sampling_defaults: SamplingDefaults,
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.clients = {"selector": selector, "trainer": trainer, "generator": generator}
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.sampling_defaults = sampling_defaults
        self.api_keys = settings.server.keys()
        self.created = now()
        self.metrics = Metrics()
        self.pipeline = Pipeline(selector, trainer, generator, self.metrics)
        self._in_flight = 0

    # ---- admission and small routes ----------------------------------------------------------------

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                param="model",
                code="model_not_found",
            )

    def admit(self) -> None:
        if self._in_flight >= self.settings.server.max_pending:
            raise APIError(
                429, "The server is at capacity; retry shortly.", "rate_limit_error", code="queue_full", retry_after=1
            )
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)

    def leave(self) -> None:
        self._in_flight -= 1
        self.metrics.in_flight.set(self._in_flight)

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created)])

    async def health(self) -> HealthResponse:
        """Ready only when every part answers: index loaded, trainer model loaded, engine up."""
        parts = {}
        for name, client in self.clients.items():
            try:
                parts[name] = await asyncio.wait_for(client.call("ready"), _READY_TIMEOUT_S)
            except TimeoutError:
                parts[name] = f"not ready (no answer within {_READY_TIMEOUT_S:.0f} s)"
            except Exception as exc:
                parts[name] = f"not ready ({type(exc).__name__})"
        ok = all(value.startswith("ready") for value in parts.values())
        return HealthResponse(status="ok" if ok else "unavailable", parts=parts)

    # ---- request preparation -----------------------------------------------------------------------

    def _chat_prompt_ids(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in req.messages]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _completion_prompt_ids(self, req: CompletionRequest) -> list[int]:
        return list(self.tokenizer(req.prompt, add_special_tokens=True).input_ids)

    def _job(
        self, req: ChatCompletionRequest | CompletionRequest, request_id: str, prompt_ids: list[int], default_max: int
    ) -> Job:
        self.check_model(req.model)
        if req.n > self.settings.server.limits.n:
            raise bad_request(f"n is {req.n}; this server allows at most {self.settings.server.limits.n}", "n")
        param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        room = self.max_model_len - len(prompt_ids)
        if room <= 0:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(prompt_ids)}.",
                param,
                "context_length_exceeded",
            )
        limit = req.token_limit
        if limit is not None and limit > room:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(prompt_ids)} and {limit} more were requested.",
                "max_tokens",
                "context_length_exceeded",
            )
        plan = plan_adaptation(req.adaptation, self.settings)
        query = req.query()
        if plan.enabled and not query.strip():
            raise bad_request(
                "The prompt has no text to select training documents for; send adaptation.enabled=false to "
                "answer it with the base model.",
                param,
            )
        sampling = req.to_sampling(limit if limit is not None else min(default_max, room), self.sampling_defaults)
        return Job(request_id or uuid.uuid4().hex, query, prompt_ids, sampling, plan)

    # ---- routes ------------------------------------------------------------------------------------

    async def chat(
        self, req: ChatCompletionRequest, request_id: str = ""
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        self.check_model(req.model)
        prompt_ids = await asyncio.to_thread(self._chat_prompt_ids, req)
        job = self._job(req, request_id, prompt_ids, self.settings.generator.default_max_tokens)
        return await self._respond(job, ChatFormat(self, job, req), req)

    async def completion(self, req: CompletionRequest, request_id: str = "") -> CompletionResponse | AsyncIterator[str]:
        self.check_model(req.model)
        prompt_ids = await asyncio.to_thread(self._completion_prompt_ids, req)
        job = self._job(req, request_id, prompt_ids, 16)
        return await self._respond(job, CompletionFormat(self, job, req), req)

    async def _respond(self, job: Job, fmt: ChatFormat | CompletionFormat, req):
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._sse(job, fmt, include_usage)
        output = Output.of(job.sampling.n)
        async with aclosing(self.pipeline.run(job)) as events:
            async for event in events:
                if isinstance(event, Chunk):
                    output.add(event)
        return fmt.response(output, len(job.prompt_ids))

    async def _sse(self, job: Job, fmt: ChatFormat | CompletionFormat, include_usage: bool) -> AsyncIterator[str]:
        """The one SSE emitter: progress (when asked for), an opening chunk per choice, token chunks, usage,
        [DONE]; an SSE comment whenever the stream would otherwise stay silent for `heartbeat_s`."""
        output = Output.of(job.sampling.n)
        progress = job.plan.progress
        async for event in with_heartbeat(self.pipeline.run(job), self.settings.server.heartbeat_s):
            if event is None:
                yield ": keep-alive\n\n"
            elif isinstance(event, Selected):
                if progress:
                    selected = SelectedEvent(
                        documents=event.documents, sigma2=event.sigma2, stop_reason=event.stop_reason
                    )
                    yield _data(fmt.chunk(adaptation=selected))
            elif isinstance(event, TrainStep):
                if progress:
                    yield _data(fmt.chunk(adaptation=TrainingEvent(step=event.step, loss=event.loss)))
            elif isinstance(event, Adapted):
                yield _data(fmt.opening(event.report))
            else:
                first = output.add(event)
                chunk = fmt.delta(event, output, first)
                if chunk is not None:
                    yield _data(chunk)
        if include_usage:
            completion = 0 if isinstance(fmt, CompletionFormat) and fmt.scoring else output.completion_tokens
            yield _data(fmt.chunk(usage=UsageInfo.of(len(job.prompt_ids), completion)))
        yield "data: [DONE]\n\n"


def local_server(settings: Settings) -> OpenAIServer:
    """The whole application in this process, without Ray (tests, and the simplest embedding)."""
    from transformers import AutoTokenizer

    from serving.services import GeneratorService, SelectorService, TrainerService, model_dir

    generator = GeneratorService(settings)
    model = model_dir(settings)
    return OpenAIServer(
        settings,
        AutoTokenizer.from_pretrained(model),
        LocalClient(SelectorService(settings)),
        LocalClient(TrainerService(settings)),
        LocalClient(generator),
        generator.max_model_len(),
        settings.server.served_model_name or model.name,
        SamplingDefaults.from_model(model),
    )
