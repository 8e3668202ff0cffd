"""How each route's responses and stream chunks look: chat (`ChatFormat`) and completions
(`CompletionFormat`) over the same accumulated generator output (`Output`), so one emitter serves both."""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.contracts import Chunk, TokenLogprobs
from serving.pipeline import Job
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
    TopLogprob,
    UsageInfo,
    new_id,
    now,
)


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


class _Format:
    """How one route's responses and stream chunks look."""

    prefix = ""

    def __init__(self, tokenizer, model_name: str, job: Job) -> None:
        self.tokenizer, self.model_name, self.job = tokenizer, model_name, job
        self.id = new_id(self.prefix, job.request_id)
        self.created = now()

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def completion_tokens(self, output: Output) -> int:
        """Tokens to bill as completion (usage)."""
        return output.completion_tokens

    def envelope(self) -> dict:
        """The fields every response and chunk of this request share."""
        return {"id": self.id, "created": self.created, "model": self.model_name}

    def prompt_tokens(self, context_tokens: int) -> int:
        """Prompt tokens to bill: the request's, and what documents placed before it added."""
        return len(self.job.prompt_ids) + context_tokens

    def summary(self, output: Output, report: AdaptationReport) -> dict:
        """The fields a whole (non-streamed) response adds: usage and the adaptation report."""
        usage = UsageInfo.of(self.prompt_tokens(report.context_tokens), self.completion_tokens(output))
        return {**self.envelope(), "usage": usage, "adaptation": report}


class ChatFormat(_Format):
    prefix = "chatcmpl"

    def __init__(self, tokenizer, model_name: str, job: Job, req: ChatCompletionRequest) -> None:
        super().__init__(tokenizer, model_name, job)
        self.top = (req.top_logprobs or 0) if req.logprobs else None

    def chunk(self, choices: list[ChatStreamChoice] | None = None, **extra) -> ChatCompletionChunk:
        return ChatCompletionChunk(choices=choices or [], **self.envelope(), **extra)

    def opening(self, report: AdaptationReport) -> ChatCompletionChunk:
        n = self.job.sampling.n
        choices = [ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(n)]
        return self.chunk(choices, adaptation=report)

    def delta(
        self, chunk: Chunk, output: Output, first: bool, report: AdaptationReport | None
    ) -> ChatCompletionChunk | None:
        """One token chunk; `report` (the final one) rides on the last chunk of the request."""
        if not (chunk.text or chunk.finish_reason or chunk.logprobs):
            return None
        logprobs = self.logprobs(chunk.token_ids, chunk.logprobs or []) if self.top is not None else None
        choice = ChatStreamChoice(
            index=chunk.index,
            delta=DeltaMessage(content=chunk.text),
            logprobs=logprobs,
            finish_reason=chunk.finish_reason,
        )
        return self.chunk([choice], adaptation=report if output.done else None)

    @staticmethod
    def _top(piece: str, logprob: float) -> TopLogprob:
        return TopLogprob(token=piece, logprob=logprob, bytes=list(piece.encode()))

    def logprobs(self, token_ids: list[int], entries: list[TokenLogprobs]) -> ChatLogprobs:
        content = []
        for token, entry in zip(token_ids, entries, strict=False):
            piece = self.piece(token)
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])[: self.top]
            top = [self._top(self.piece(t), v) for t, v in ranked]
            content.append(
                ChatTokenLogprob(token=piece, logprob=entry[token], bytes=list(piece.encode()), top_logprobs=top)
            )
        return ChatLogprobs(content=content)

    def response(self, output: Output, report: AdaptationReport) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=c.text),
                logprobs=self.logprobs(c.token_ids, c.logprobs) if self.top is not None else None,
                finish_reason=c.finish_reason or "stop",
            )
            for i, c in enumerate(output.choices)
        ]
        return ChatCompletionResponse(choices=choices, **self.summary(output, report))


class CompletionFormat(_Format):
    prefix = "cmpl"

    def __init__(self, tokenizer, model_name: str, job: Job, req: CompletionRequest) -> None:
        super().__init__(tokenizer, model_name, job)
        self.req = req
        self.scoring = req.max_tokens == 0  # echo the prompt with its logprobs, generate nothing
        self._offsets: dict[int, int] = {}
        """Per streamed choice, the text offset where its next chunk's first token starts."""

    def chunk(self, choices: list[CompletionChoice] | None = None, **extra) -> CompletionChunk:
        return CompletionChunk(choices=choices or [], **self.envelope(), **extra)

    def opening(self, report: AdaptationReport) -> CompletionChunk:
        choices = [CompletionChoice(index=i, text="") for i in range(self.job.sampling.n)]
        return self.chunk(choices, adaptation=report)

    def completion_tokens(self, output: Output) -> int:
        return 0 if self.scoring else output.completion_tokens

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

    def delta(
        self, chunk: Chunk, output: Output, first: bool, report: AdaptationReport | None
    ) -> CompletionChunk | None:
        """One token chunk; `report` (the final one) rides on the last chunk of the request."""
        text = self._text(chunk.text, first)
        if not (text or chunk.finish_reason or (chunk.logprobs and not self.scoring)):
            return None
        logprobs = None
        if self.req.logprobs is not None:
            offset = self._offsets.get(chunk.index, 0)
            logprobs = self.logprobs(self._entries(output, chunk.token_ids, chunk.logprobs or [], first), offset)
            if logprobs.tokens:  # the next chunk goes on where this one ends, as in the whole response
                self._offsets[chunk.index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        finish = ("length" if self.scoring else chunk.finish_reason) if chunk.finish_reason else None
        choice = CompletionChoice(index=chunk.index, text=text, logprobs=logprobs, finish_reason=finish)
        return self.chunk([choice], adaptation=report if output.done else None)

    def response(self, output: Output, report: AdaptationReport) -> CompletionResponse:
        choices = []
        for i, c in enumerate(output.choices):
            logprobs = None
            if self.req.logprobs is not None:
                logprobs = self.logprobs(self._entries(output, c.token_ids, c.logprobs, True), 0)
            finish = "length" if self.scoring else (c.finish_reason or "stop")
            choices.append(
                CompletionChoice(index=i, text=self._text(c.text, True), logprobs=logprobs, finish_reason=finish)
            )
        return CompletionResponse(choices=choices, **self.summary(output, report))
