"""The OpenAI routes' logic: validate, resolve the request's adaptation once, run the pipeline, and answer
with its events.

`OpenAIServer` is a plain object over three services (`SelectorAPI`, `TrainerAPI`, `GeneratorAPI`: objects
in this process or Ray Serve handles). It knows the model's tokenizer, prompt renderer and context
length, checks what a request asks for, and hands the pipeline's events to the format layer
(`serving.stream`: one whole response, or one SSE emitter that chat and completions share); each route
only says how its responses look (`serving.formats`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Sequence

from serving.clients import GeneratorAPI, SelectorAPI, Service, TrainerAPI
from serving.config import Settings
from serving.contracts import Readiness, SamplingDefaults, SessionRef, resolve
from serving.errors import APIError, bad_request
from serving.formats import ChatFormat, CompletionFormat
from serving.metrics import Metrics, PrometheusMetrics
from serving.pipeline import Job, Pipeline, Renderer
from serving.prompts import PromptRenderer, load_chat_template
from serving.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    SessionDeleted,
    StreamOptions,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    now,
)
from serving.services import experts_unavailable
from serving.stream import collect, sse

log = logging.getLogger(__name__)

_READY_TIMEOUT_S = 5.0


class OpenAIServer:
    """OpenAI routes' logic over the Selector, Trainer and Generator clients."""

    def __init__(
        self,
        settings: Settings,
        tokenizer,
        selector: SelectorAPI,
        trainer: TrainerAPI,
        generator: GeneratorAPI,
        max_model_len: int,
        model_name: str,
        sampling_defaults: SamplingDefaults,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.clients: dict[str, Service] = {"selector": selector, "trainer": trainer, "generator": generator}
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.sampling_defaults = sampling_defaults
        self.api_keys = settings.server.keys()
        self.prompts = PromptRenderer(tokenizer, load_chat_template(settings.generator.chat_template))
        self.created = now()
        self.metrics = metrics or PrometheusMetrics()
        self.pipeline = Pipeline(selector, trainer, generator, self.metrics)
        self.merging_off = experts_unavailable(settings)
        """Why `merge` modes are refused (None: the index's experts are there)."""

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
        parts: dict[str, Readiness] = {}
        for name, client in self.clients.items():
            try:
                parts[name] = await asyncio.wait_for(client.ready(), _READY_TIMEOUT_S)
            except TimeoutError:
                parts[name] = Readiness(False, f"not ready (no answer within {_READY_TIMEOUT_S:.0f} s)")
            except Exception as exc:
                parts[name] = Readiness(False, f"not ready ({type(exc).__name__})")
        ok = all(part.ready for part in parts.values())
        details = {name: part.detail for name, part in parts.items()}
        return HealthResponse(status="ok" if ok else "unavailable", parts=details)

    # ---- request preparation -----------------------------------------------------------------------

    def _chat_prompt_ids(self, req: ChatCompletionRequest, documents: Sequence[str] = ()) -> list[int]:
        return self.prompts.chat(req.messages, documents)

    def _completion_prompt_ids(self, req: CompletionRequest, documents: Sequence[str] = ()) -> list[int]:
        return self.prompts.completion(req.text(), documents)

    def _job(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        request_id: str,
        prompt_ids: list[int],
        default_max: int,
        caller: str = "",
    ) -> Job:
        if req.n > self.settings.server.limits.n:
            raise bad_request(f"n is {req.n}; this server allows at most {self.settings.server.limits.n}", "n")
        param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        spec = resolve(req.adaptation, self.settings, caller)
        if spec.merges and self.merging_off is not None:
            message = (
                f"adaptation.mode {spec.mode} needs the index's expert adapters, and this server has none that fit "
                "its index and model; the operator builds them with `sift-serve experts build` (then restarts), "
                "or send adaptation.mode train"
            )
            raise bad_request(message, "adaptation.mode", "no_experts")
        context = spec.context_budget
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
        if spec.enabled and not query.strip():
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
        render: Renderer | None = None
        if context and isinstance(req, ChatCompletionRequest):
            render = functools.partial(self._chat_prompt_ids, req)
        elif context and isinstance(req, CompletionRequest):
            render = functools.partial(self._completion_prompt_ids, req)
        return Job(request_id or uuid.uuid4().hex, query, tuple(prompt_ids), sampling, spec, render)

    # ---- tokenizer routes ----------------------------------------------------------------------------

    async def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        """vLLM's /tokenize: the ids a prompt or conversation becomes (chat: through the chat template)."""
        if req.model is not None:
            self.check_model(req.model)

        def ids() -> list[int]:
            if isinstance(req, TokenizeChatRequest):
                ids = self.prompts.chat(req.messages, (), req.add_generation_prompt, req.continue_final_message)
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
        self, req: ChatCompletionRequest, request_id: str = "", caller: str = ""
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        self.check_model(req.model)
        prompt_ids = await asyncio.to_thread(self._chat_prompt_ids, req)
        job = self._job(req, request_id, prompt_ids, self.settings.generator.default_max_tokens, caller)
        return await self._respond(job, ChatFormat(self.tokenizer, self.model_name, job, req), req)

    async def completion(
        self, req: CompletionRequest, request_id: str = "", caller: str = ""
    ) -> CompletionResponse | AsyncIterator[str]:
        self.check_model(req.model)
        prompt_ids = await asyncio.to_thread(self._completion_prompt_ids, req)
        job = self._job(req, request_id, prompt_ids, 16, caller)
        return await self._respond(job, CompletionFormat(self.tokenizer, self.model_name, job, req), req)

    async def delete_session(self, caller: str, session_id: str) -> SessionDeleted:
        """Drop the caller's conversation `session_id` at once (another caller's, of the same id, is untouched)."""
        if not await self.pipeline.trainer.drop_session(SessionRef.of(caller, session_id).key):
            raise APIError(
                404, f"No session `{session_id}` for this API key.", param="session_id", code="session_not_found"
            )
        return SessionDeleted(id=session_id)

    async def _respond(self, job: Job, fmt: ChatFormat | CompletionFormat, req):
        self.pipeline.check(job)  # a part that is down is a 503 now, not after a stream has begun
        events = self.pipeline.run(job)
        if not req.stream:
            return await collect(events, job, fmt)
        options = req.stream_options or StreamOptions()
        continuous = options.include_usage and options.continuous_usage_stats
        return sse(events, job, fmt, self.settings.server.heartbeat_s, options.include_usage, continuous)


def local_server(settings: Settings) -> OpenAIServer:
    """The whole application in this process, without Ray (tests, and the simplest embedding)."""
    from transformers import AutoTokenizer

    from serving.services import GeneratorService, SelectorService, TrainerService, model_dir

    generator = GeneratorService(settings)
    model = model_dir(settings)
    return OpenAIServer(
        settings,
        AutoTokenizer.from_pretrained(model),
        SelectorService(settings),
        TrainerService(settings),
        generator,
        generator.max_model_len(),
        settings.server.served_model_name or model.name,
        SamplingDefaults.from_model(model),
    )
