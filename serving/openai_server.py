"""The OpenAI routes' logic: validate, run the pipeline, and turn its events into OpenAI responses.

`OpenAIServer` is a plain object over three clients (Selector, Trainer, Generator; local objects or Ray
Serve handles). It knows the model's tokenizer, chat template and context length, checks what a request
asks for, and streams the pipeline's events through one SSE emitter (`_sse`) that chat and completions
share; each route only says how its responses look (`serving.formats`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from adapters.trainer import TrainStep
from serving.clients import LocalClient
from serving.config import ContextMode, Settings
from serving.context import PREAMBLE, as_text, fit
from serving.engines import Chunk, SamplingDefaults
from serving.errors import APIError, bad_request
from serving.formats import ChatFormat, CompletionFormat, Output
from serving.metrics import Metrics, PrometheusMetrics
from serving.pipeline import Adapted, Job, Pipeline, Selected, plan_adaptation
from serving.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    SelectedEvent,
    StreamOptions,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    TrainingEvent,
    UsageInfo,
    now,
)
from serving.sse import sse_data, with_heartbeat

log = logging.getLogger(__name__)

_READY_TIMEOUT_S = 5.0


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
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.clients = {"selector": selector, "trainer": trainer, "generator": generator}
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.sampling_defaults = sampling_defaults
        self.api_keys = settings.server.keys()
        self.chat_template = load_chat_template(settings.generator.chat_template)
        self._template_knows_tool_calls = "tool_calls" in (self.chat_template or tokenizer.chat_template or "")
        self.created = now()
        self.metrics = metrics or PrometheusMetrics()
        self.pipeline = Pipeline(selector, trainer, generator, self.metrics)

    # ---- small routes ----------------------------------------------------------------

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                param="model",
                code="model_not_found",
            )

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

    def render_chat(
        self,
        messages: Sequence[ChatMessage],
        documents: Sequence[str] = (),
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[int]:
        """The conversation as prompt ids through the chat template, with `documents` (if any) as a leading
        system message. Replayed tool calls reach the template as `tool_calls` where it reads them, else as
        JSON text in the assistant's content, so the model sees them either way."""
        rendered = [template_message(m, self._template_knows_tool_calls) for m in messages]
        if documents:
            rendered.insert(0, {"role": "system", "content": PREAMBLE + "\n\n" + as_text(documents).strip()})
        try:
            ids = self.tokenizer.apply_chat_template(
                rendered,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=True,
            )
        except (ValueError, TemplateError) as exc:  # the template refused these messages: the client's to fix
            message = f"The chat template cannot render these messages ({type(exc).__name__})."
            raise bad_request(message, "messages") from exc
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _chat_prompt_ids(self, req: ChatCompletionRequest, documents: Sequence[str] = ()) -> list[int]:
        return self.render_chat(req.messages, documents)

    def _completion_prompt_ids(self, req: CompletionRequest, documents: Sequence[str] = ()) -> list[int]:
        text = as_text(documents) + req.prompt if documents else req.prompt
        return list(self.tokenizer(text, add_special_tokens=True).input_ids)

    def _job(
        self, req: ChatCompletionRequest | CompletionRequest, request_id: str, prompt_ids: list[int], default_max: int
    ) -> Job:
        if req.n > self.settings.server.limits.n:
            raise bad_request(f"n is {req.n}; this server allows at most {self.settings.server.limits.n}", "n")
        param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        plan = plan_adaptation(req.adaptation, self.settings)
        context = plan.context_tokens if plan.enabled and plan.context is ContextMode.PREPEND else 0
        if context and getattr(req, "echo", False):
            raise bad_request(
                "echo returns the prompt as sent; with adaptation.context 'prepend' the model would see "
                "documents before it. Send one or the other.",
                "adaptation.context",
            )
        room = self.max_model_len - len(prompt_ids) - context
        used = f"the prompt has {len(prompt_ids)}" + (
            f" and documents may add {context} (adaptation.context_tokens)" if context else ""
        )
        if room <= 0:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens; {used}.",
                param,
                "context_length_exceeded",
            )
        limit = req.token_limit
        if limit is not None and limit > room:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens; {used}, and {limit} more "
                "were requested.",
                "max_tokens",
                "context_length_exceeded",
            )
        query = req.query()
        if plan.enabled and not query.strip():
            raise bad_request(
                "The prompt has no text to select training documents for; send adaptation.enabled=false to "
                "answer it with the base model.",
                param,
            )
        sampling = req.to_sampling(limit if limit is not None else min(default_max, room), self.sampling_defaults)
        if sampling.min_tokens > sampling.max_tokens:
            raise bad_request(
                f"min_tokens ({sampling.min_tokens}) must not be larger than max_tokens ({sampling.max_tokens})",
                "min_tokens",
            )
        job = Job(request_id or uuid.uuid4().hex, query, prompt_ids, sampling, plan)
        if context:
            render = self._chat_prompt_ids if isinstance(req, ChatCompletionRequest) else self._completion_prompt_ids
            job.with_context = lambda documents, budget: fit(
                documents, budget, lambda docs: render(req, docs), len(prompt_ids)
            )
        return job

    # ---- tokenizer routes ----------------------------------------------------------------------------

    async def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        """vLLM's /tokenize: the ids a prompt or conversation becomes (chat: through the chat template)."""
        if req.model is not None:
            self.check_model(req.model)

        def ids() -> list[int]:
            if isinstance(req, TokenizeChatRequest):
                ids = self.render_chat(req.messages, (), req.add_generation_prompt, req.continue_final_message)
                if req.add_special_tokens and self.tokenizer.bos_token_id is not None:
                    ids = [self.tokenizer.bos_token_id, *ids]
                return ids
            return list(self.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids)

        tokens = await asyncio.to_thread(ids)
        strs = self.tokenizer.convert_ids_to_tokens(tokens) if req.return_token_strs else None
        return TokenizeResponse(count=len(tokens), max_model_len=self.max_model_len, tokens=tokens, token_strs=strs)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        """vLLM's /detokenize: the text of token ids (ids outside the vocabulary are a 400)."""
        if req.model is not None:
            self.check_model(req.model)
        vocabulary = len(self.tokenizer)
        for position, token in enumerate(req.tokens):
            if token >= vocabulary:
                raise bad_request(f"token {token} is outside the vocabulary (size {vocabulary})", f"tokens.{position}")
        return DetokenizeResponse(prompt=await asyncio.to_thread(self.tokenizer.decode, req.tokens))

    # ---- routes ------------------------------------------------------------------------------------

    async def chat(
        self, req: ChatCompletionRequest, request_id: str = ""
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        self.check_model(req.model)
        prompt_ids = await asyncio.to_thread(self._chat_prompt_ids, req)
        job = self._job(req, request_id, prompt_ids, self.settings.generator.default_max_tokens)
        return await self._respond(job, ChatFormat(self.tokenizer, self.model_name, job, req), req)

    async def completion(self, req: CompletionRequest, request_id: str = "") -> CompletionResponse | AsyncIterator[str]:
        self.check_model(req.model)
        prompt_ids = await asyncio.to_thread(self._completion_prompt_ids, req)
        job = self._job(req, request_id, prompt_ids, 16)
        return await self._respond(job, CompletionFormat(self.tokenizer, self.model_name, job, req), req)

    async def _respond(self, job: Job, fmt: ChatFormat | CompletionFormat, req):
        self.pipeline.check(job)  # a part that is down is a 503 now, not after a stream has begun
        if req.stream:
            options = req.stream_options or StreamOptions()
            return self._sse(job, fmt, options.include_usage, options.include_usage and options.continuous_usage_stats)
        output = Output.of(job.sampling.n)
        async with aclosing(self.pipeline.run(job)) as events:
            async for event in events:
                if isinstance(event, Chunk):
                    output.add(event)
        return fmt.response(output, len(job.prompt_ids))

    async def _sse(
        self, job: Job, fmt: ChatFormat | CompletionFormat, include_usage: bool, continuous_usage: bool
    ) -> AsyncIterator[str]:
        """The one SSE emitter: progress (when asked for), an opening chunk per choice, token chunks, usage,
        [DONE]; an SSE comment whenever the stream would otherwise stay silent for `heartbeat_s`. With
        `continuous_usage` (vLLM's continuous_usage_stats) the opening and token chunks carry usage so far."""
        output = Output.of(job.sampling.n)
        progress = job.plan.progress

        def usage() -> UsageInfo:
            return UsageInfo.of(len(job.prompt_ids), fmt.completion_tokens(output))

        async for event in with_heartbeat(self.pipeline.run(job), self.settings.server.heartbeat_s):
            if event is None:
                yield ": keep-alive\n\n"
            elif isinstance(event, Selected):
                if progress:
                    selected = SelectedEvent(
                        documents=event.documents, sigma2=event.sigma2, stop_reason=event.stop_reason
                    )
                    yield sse_data(fmt.chunk(adaptation=selected))
            elif isinstance(event, TrainStep):
                if progress:
                    yield sse_data(fmt.chunk(adaptation=TrainingEvent(step=event.step, loss=event.loss)))
            elif isinstance(event, Adapted):
                opening = fmt.opening(event.report)
                opening.usage = usage() if continuous_usage else None
                yield sse_data(opening)
            else:
                first = output.add(event)
                chunk = fmt.delta(event, output, first)
                if chunk is not None:
                    chunk.usage = usage() if continuous_usage else None
                    yield sse_data(chunk)
        if include_usage:
            yield sse_data(fmt.chunk(usage=usage()))
        yield "data: [DONE]\n\n"


def load_chat_template(template: str | None) -> str | None:
    """The configured chat template: the Jinja template itself, or the path of a file holding one (as vLLM's
    --chat-template); None keeps the tokenizer's own."""
    if template is None or "{{" in template or "{%" in template:
        return template
    path = Path(template)
    if not path.is_file():
        raise FileNotFoundError(f"generator.chat_template is neither a Jinja template nor a file: {template}")
    return path.read_text()


def template_message(message: ChatMessage, knows_tool_calls: bool) -> dict[str, Any]:
    """One message as chat templates take it (`developer` is `system` to them)."""
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
    if message.tool_calls:
        calls = [call.model_dump(exclude_none=True) for call in message.tool_calls]
        if knows_tool_calls:
            out["tool_calls"] = calls
        else:
            out["content"] = "\n".join(part for part in (out["content"], json.dumps(calls)) if part)
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


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
