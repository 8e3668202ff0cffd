"""The OpenAI-compatible request logic: validate, select -> train -> generate, and shape the responses.

`OpenAIServer` is a plain object over three clients (Selector, Trainer, Generator; local objects or Ray
Serve handles). It knows the model's tokenizer and chat template, enforces the context length, applies the
`ttft` extension, and produces either a response dict or a stream of SSE lines. Whatever fails, the
adapter is released: by the generator once it has it, here before that.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from adapters.trainer import TrainerBusyError, TrainRequest, TrainResult
from serving.clients import LocalClient
from serving.config import Settings
from serving.generation import Sampling
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DocumentRef,
    ErrorBody,
    ErrorResponse,
    TTFTOptions,
    TTFTReport,
    Usage,
    model_card,
    new_id,
    now,
)
from serving.services import SelectQuery, sigma_trace

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error with an HTTP status, in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        error = ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=error).model_dump()


class Metrics:
    """Prometheus metrics of one server (its own registry, exposed at /metrics)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("sift_requests", "Requests by route and status", ["route", "status"],
                                registry=self.registry)  # fmt: skip
        self.stage = Histogram("sift_stage_seconds", "Seconds per request stage", ["stage"], registry=self.registry,
                               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120))  # fmt: skip
        self.steps = Counter("sift_steps_trained", "Test-time training steps", registry=self.registry)
        self.adapters_live = Gauge("sift_adapters_live", "Adapters made and not yet released",
                                   registry=self.registry)  # fmt: skip
        self.in_flight = Gauge("sift_requests_in_flight", "Requests being served", registry=self.registry)


@dataclass
class Run:
    """State of one request as it flows through select -> train -> generate."""

    request_id: str
    report: TTFTReport
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None


class OpenAIServer:
    """OpenAI routes' logic over the Selector, Trainer and Generator clients."""

    def __init__(self, settings: Settings, tokenizer, selector, trainer, generator, max_model_len: int,
                 model_name: str) -> None:  # fmt: skip
        self.settings = settings
        self.tokenizer = tokenizer
        self.selector, self.trainer, self.generator = selector, trainer, generator
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.created = now()
        self.metrics = Metrics()
        self._in_flight = 0

    # ---- admission ---------------------------------------------------------------------------------

    def check_auth(self, authorization: str | None) -> None:
        key = self.settings.server.api_key
        if key and authorization != f"Bearer {key}":
            raise APIError(401, "Incorrect or missing API key.", "authentication_error", code="invalid_api_key")

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")  # fmt: skip

    def admit(self) -> None:
        if self._in_flight >= self.settings.server.max_pending:
            raise APIError(429, "The server is at capacity; retry shortly.", "rate_limit_error", code="queue_full")
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)

    def leave(self) -> None:
        self._in_flight -= 1
        self.metrics.in_flight.set(self._in_flight)

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(self.model_name, self.created)]}

    # ---- request preparation -----------------------------------------------------------------------

    def _sampling(self, req: ChatCompletionRequest | CompletionRequest, prompt_len: int, default_max: int) -> Sampling:
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                                f"has {prompt_len}.", param="messages", code="context_length_exceeded")  # fmt: skip
        limit = req.token_limit
        if limit is not None and limit > room:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                                f"has {prompt_len} and {limit} more were requested.", param="max_tokens",
                           code="context_length_exceeded")  # fmt: skip
        is_completion = isinstance(req, CompletionRequest)
        return Sampling(
            max_tokens=limit if limit is not None else min(default_max, room),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=req.stop,  # type: ignore[arg-type]  (normalised to a list by the validator)
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logprobs=req.logprobs if is_completion else None,
            prompt_logprobs=(req.logprobs or 0) if is_completion and req.echo and req.logprobs is not None else None,
        )

    def _chat_prompt(self, req: ChatCompletionRequest) -> tuple[list[int], str]:
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in req.messages]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        query = next(m.text() for m in reversed(req.messages) if m.role == "user" and m.text().strip())
        return list(ids), query

    # ---- the pipeline ------------------------------------------------------------------------------

    async def _adapt(self, run: Run, query: str, options: TTFTOptions | None) -> AsyncIterator[dict]:
        """Select and train; yields progress events; leaves the adapter (or None) in the last event."""
        opts = options or TTFTOptions()
        sel, tr = self.settings.selection, self.settings.trainer
        enabled = self.settings.server.ttft_enabled if opts.enabled is None else opts.enabled
        max_steps = tr.max_steps if opts.max_steps is None else opts.max_steps
        run.report.enabled = enabled
        if not enabled or max_steps == 0:
            run.report.stop_reason = "disabled" if not enabled else "max_steps"
            yield {"adapter": None}
            return
        started = time.monotonic()
        alpha = opts.alpha if opts.alpha is not None else sel.alpha
        query_ = SelectQuery(query, min(sel.max_picks, max_steps), opts.method or sel.method,
                             opts.lambda_ or sel.lambda_, alpha, opts.candidates or sel.candidates)  # fmt: skip
        picked = await self.selector.call("select", query_)
        run.report.timings.select = time.monotonic() - started
        self.metrics.stage.labels("select").observe(run.report.timings.select)
        docs = picked["documents"]
        run.report.documents = [DocumentRef(id=d["id"], source=d["source"]) for d in docs]
        run.report.sigma2 = picked["sigma2"]
        yield {"stage": "selected", "documents": [d.model_dump() for d in run.report.documents],
               "sigma2": run.report.sigma2, "stop_reason": picked["stop_reason"]}  # fmt: skip
        if not docs:
            run.report.stop_reason = picked["stop_reason"]
            yield {"adapter": None}
            return
        request = TrainRequest(
            documents=[d["text"] for d in docs],
            document_ids=[d["id"] for d in docs],
            sigma=sigma_trace(picked["sigma2"]),
            max_steps=max_steps,
            learning_rate=opts.learning_rate,
            max_train_tokens=opts.max_train_tokens,
            time_budget_s=opts.time_budget_s,
        )
        result: TrainResult | None = None
        try:
            async for event in self.trainer.stream("train", request):
                if "result" in event:
                    result = event["result"]
                else:
                    yield {"stage": "training", **event}
        except TrainerBusyError as exc:
            raise APIError(503, f"Test-time training is saturated ({exc}); retry or send ttft.enabled=false.",
                           "server_error", code="trainer_busy") from exc  # fmt: skip
        except Exception as exc:  # training failed: the base model answers, and the response says so
            log.exception("test-time training failed for %s", run.request_id)
            run.report.error = f"training failed ({type(exc).__name__}); answered by the base model"
            run.report.stop_reason = "error"
            yield {"adapter": None}
            return
        assert result is not None
        if result.adapter is not None:
            self.metrics.adapters_live.inc()
        run.report.steps = result.steps
        run.report.losses = result.losses
        run.report.timings.queue = result.queue_seconds
        run.report.timings.train = result.train_seconds + result.export_seconds
        self.metrics.stage.labels("train").observe(run.report.timings.train)
        self.metrics.steps.inc(result.steps)
        stop = result.stop_reason
        if stop == "documents":  # trained on every pick: say why selection picked no more
            stop = "max_steps" if len(docs) == max_steps else picked["stop_reason"]
            stop = {"n": "max_picks", "exhausted": "documents"}.get(stop, stop)
        run.report.stop_reason = stop
        run.report.adapter = result.adapter is not None
        yield {"adapter": result.adapter}

    async def _pipeline(self, run: Run, query: str, prompt_ids: list[int], sampling: Sampling,
                        options: TTFTOptions | None) -> AsyncIterator[tuple[str, Any]]:  # fmt: skip
        """Yields ("progress", event), then ("trained", None), then ("chunk", Chunk)s."""
        adapter = None
        try:
            async for event in self._adapt(run, query, options):
                if "adapter" in event:
                    adapter = event["adapter"]
                else:
                    yield "progress", event
            yield "trained", None
            started = time.monotonic()
            handed, adapter = adapter, None  # from here the generator owns (and releases) the adapter
            try:
                async for chunk in self.generator.stream("generate", run.request_id, prompt_ids, sampling, handed):
                    if chunk.load_adapter_s:
                        run.report.timings.load_adapter = chunk.load_adapter_s
                    run.text += chunk.text
                    run.completion_tokens += len(chunk.token_ids)
                    if chunk.logprobs:
                        run.logprobs.extend(chunk.logprobs)
                    if chunk.prompt_logprobs is not None:
                        run.prompt_logprobs = chunk.prompt_logprobs
                    run.finish_reason = chunk.finish_reason or run.finish_reason
                    run.report.timings.generate = time.monotonic() - started - run.report.timings.load_adapter
                    yield "chunk", chunk
            finally:
                if handed is not None:
                    self.metrics.adapters_live.dec()
            self.metrics.stage.labels("generate").observe(run.report.timings.generate)
        finally:
            if adapter is not None:  # made, but the request ended before generation took it
                adapter.release()
                self.metrics.adapters_live.dec()

    # ---- routes ------------------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        self.check_model(req.model)
        prompt_ids, query = self._chat_prompt(req)
        sampling = self._sampling(req, len(prompt_ids), self.settings.generator.default_max_tokens)
        run = Run(new_id("chatcmpl"), TTFTReport(enabled=False))
        events = self._pipeline(run, query, prompt_ids, sampling, req.ttft)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._chat_stream(run, events, len(prompt_ids), include_usage)
        async for _ in events:
            pass
        return {
            "id": run.request_id, "object": "chat.completion", "created": now(), "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": run.text},
                         "logprobs": None, "finish_reason": run.finish_reason or "stop"}],
            "usage": _usage(len(prompt_ids), run.completion_tokens),
            "ttft": run.report.model_dump(),
        }  # fmt: skip

    async def _chat_stream(self, run: Run, events, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        base = {
            "id": run.request_id,
            "object": "chat.completion.chunk",
            "created": now(),
            "model": self.model_name,
        }
        async for kind, value in events:
            if kind == "progress":
                yield _sse({**base, "choices": [], "ttft": value})
            elif kind == "trained":
                delta = {"role": "assistant", "content": ""}
                yield _sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
                            "ttft": run.report.model_dump()})  # fmt: skip
            else:
                choice = {"index": 0, "delta": {"content": value.text} if value.text else {}, "logprobs": None,
                          "finish_reason": value.finish_reason}  # fmt: skip
                if value.text or value.finish_reason:
                    extra = {"ttft": run.report.model_dump()} if value.finish_reason else {}
                    yield _sse({**base, "choices": [choice], **extra})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, run.completion_tokens)})
        yield "data: [DONE]\n\n"

    async def completion(self, req: CompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        self.check_model(req.model)
        prompt_ids = self.tokenizer(req.prompt, add_special_tokens=True).input_ids
        sampling = self._sampling(req, len(prompt_ids), 16)
        run = Run(new_id("cmpl"), TTFTReport(enabled=False))
        events = self._pipeline(run, req.prompt, prompt_ids, sampling, req.ttft)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._completion_stream(run, events, req, prompt_ids, include_usage)
        async for _ in events:
            pass
        text, logprobs = self._completion_text(run, req, prompt_ids)
        return {
            "id": run.request_id, "object": "text_completion", "created": now(), "model": self.model_name,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                         "finish_reason": "length" if req.max_tokens == 0 else (run.finish_reason or "stop")}],
            "usage": _usage(len(prompt_ids), 0 if req.max_tokens == 0 else run.completion_tokens),
            "ttft": run.report.model_dump(),
        }  # fmt: skip

    def _completion_text(self, run: Run, req: CompletionRequest, prompt_ids: list[int]):
        generated = "" if req.max_tokens == 0 else run.text
        gen_lp = [] if req.max_tokens == 0 else run.logprobs
        text = (req.prompt + generated) if req.echo else generated
        if req.logprobs is None:
            return text, None
        entries: list[tuple[int, dict[int, float] | None]] = []
        if req.echo:
            entries += list(zip(prompt_ids, run.prompt_logprobs or [None] * len(prompt_ids), strict=False))
        entries += [(next(iter(lp)), lp) for lp in gen_lp]
        tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
        for token, lp in entries:
            piece = self.tokenizer.decode([token])
            tokens.append(piece)
            offsets.append(offset)
            offset += len(piece)
            token_lps.append(None if lp is None else lp[token])
            tops.append(None if lp is None else {self.tokenizer.decode([t]): v for t, v in lp.items()})
        return text, {
            "tokens": tokens,
            "token_logprobs": token_lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    async def _completion_stream(self, run: Run, events, req: CompletionRequest, prompt_ids: list[int],
                                 include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
        base = {"id": run.request_id, "object": "text_completion", "created": now(), "model": self.model_name}
        async for kind, value in events:
            if kind == "progress":
                yield _sse({**base, "choices": [], "ttft": value})
            elif kind == "trained":
                first = req.prompt if req.echo else ""
                yield _sse({**base, "choices": [{"index": 0, "text": first, "logprobs": None, "finish_reason": None}],
                            "ttft": run.report.model_dump()})  # fmt: skip
            elif req.max_tokens != 0 and (value.text or value.finish_reason):
                extra = {"ttft": run.report.model_dump()} if value.finish_reason else {}
                choice = {
                    "index": 0,
                    "text": value.text,
                    "logprobs": None,
                    "finish_reason": value.finish_reason,
                }
                yield _sse({**base, "choices": [choice], **extra})
        if include_usage:
            completion = 0 if req.max_tokens == 0 else run.completion_tokens
            yield _sse({**base, "choices": [], "usage": _usage(len(prompt_ids), completion)})
        yield "data: [DONE]\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion).model_dump()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


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
    )
