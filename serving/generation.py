"""Generators: the engines that answer, with or without a request's adapter, behind one interface.

`VLLMGenerator` (primary) runs vLLM's AsyncLLM with LoRA enabled: per request add_lora -> generate
(streamed) -> remove_lora -> delete the adapter directory. `TransformersGenerator` implements the same
interface with transformers + peft: the fallback where vLLM cannot run, and the engine of unit tests.
Whatever happens (finish, error, cancellation), the adapter leaves the engine and its directory is deleted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from adapters.handle import AdapterHandle
from serving.config import GeneratorConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request, engine-neutral."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    """Log-probabilities of generated tokens (with this many alternatives), None for none."""
    prompt_logprobs: int | None = None
    """Log-probabilities of the prompt's tokens (echo), None for none."""


@dataclass
class Chunk:
    """A piece of a streamed generation."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    """Per generated token: {token id: logprob} with the chosen token first."""
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """Per prompt token (first chunk only): {token id: logprob}, None for the first token."""
    load_adapter_s: float = 0.0


class Generator(Protocol):
    max_model_len: int

    def generate(
        self, request_id: str, prompt_ids: list[int], sampling: Sampling, adapter: AdapterHandle | None
    ) -> AsyncIterator[Chunk]: ...

    def live_adapters(self) -> int: ...

    def shutdown(self) -> None: ...


def context_length(model_dir: Path, config: GeneratorConfig) -> int:
    """The generator's context length: the configured one, capped by the model's own."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(model_dir)
    return min(config.max_model_len, getattr(model_config, "max_position_embeddings", config.max_model_len))


def _logprob_dict(entry, chosen: int | None) -> dict[int, float]:
    """vLLM's {token: Logprob} as {token: float}, the chosen token first."""
    out = {}
    if chosen is not None and chosen in entry:
        out[chosen] = float(entry[chosen].logprob)
    for token, lp in entry.items():
        out.setdefault(int(token), float(lp.logprob))
    return out


class _CountsAdapters:
    """How many adapters an engine holds right now (for metrics and leak checks)."""

    _live = 0

    def live_adapters(self) -> int:
        return self._live


class VLLMGenerator(_CountsAdapters):
    """vLLM AsyncLLM with per-request LoRA adapters."""

    def __init__(self, model_dir: Path, config: GeneratorConfig, max_lora_rank: int, device: str = "cpu") -> None:
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        dtype = config.dtype if config.dtype != "auto" else ("float32" if device == "cpu" else "auto")
        self.max_model_len = context_length(model_dir, config)
        args = AsyncEngineArgs(
            model=str(model_dir),
            dtype=dtype,
            max_model_len=self.max_model_len,
            enable_lora=True,
            max_lora_rank=max_lora_rank,
            max_loras=config.max_loras,
            max_cpu_loras=max(config.max_cpu_loras or config.max_loras, config.max_loras),
            enforce_eager=device == "cpu",
            gpu_memory_utilization=config.gpu_memory_utilization,
            disable_log_stats=True,
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self._lora_ids = itertools.count(1)

    async def generate(
        self, request_id: str, prompt_ids: list[int], sampling: Sampling, adapter: AdapterHandle | None
    ) -> AsyncIterator[Chunk]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        lora, load_s = None, 0.0
        try:
            if adapter is not None:
                started = time.monotonic()
                lora = LoRARequest(adapter.name, next(self._lora_ids), str(adapter.path))
                await self.engine.add_lora(lora)
                self._live += 1
                load_s = time.monotonic() - started
            params = SamplingParams(
                max_tokens=max(1, sampling.max_tokens),
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                stop=sampling.stop,
                seed=sampling.seed,
                presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty,
                logprobs=sampling.logprobs,
                prompt_logprobs=sampling.prompt_logprobs,
                output_kind=RequestOutputKind.DELTA,
            )
            first = True
            async for out in self.engine.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), params, request_id, lora_request=lora
            ):
                o = out.outputs[0]
                chunk = Chunk(text=o.text, token_ids=list(o.token_ids), finish_reason=o.finish_reason)
                if o.logprobs is not None:
                    chunk.logprobs = [_logprob_dict(e, t) for e, t in zip(o.logprobs, o.token_ids, strict=False)]
                if first:
                    chunk.load_adapter_s = load_s
                    if sampling.prompt_logprobs is not None and out.prompt_logprobs is not None:
                        chunk.prompt_logprobs = [
                            None if e is None else _logprob_dict(e, t)
                            for e, t in zip(out.prompt_logprobs, prompt_ids, strict=False)
                        ]
                    first = False
                yield chunk
        finally:
            if lora is not None:
                await asyncio.shield(self.engine.remove_lora(lora.lora_int_id))
                self._live -= 1
            if adapter is not None:
                adapter.release()

    def shutdown(self) -> None:
        self.engine.shutdown()


class TransformersGenerator(_CountsAdapters):
    """transformers + peft, token by token with a KV cache; one request at a time."""

    def __init__(self, model_dir: Path, config: GeneratorConfig, device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        self.device = device
        self.max_model_len = context_length(model_dir, config)
        self._lock = threading.Lock()

    async def generate(
        self, request_id: str, prompt_ids: list[int], sampling: Sampling, adapter: AdapterHandle | None
    ) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                self._run(prompt_ids, sampling, adapter, stop, emit)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                emit(exc)
            finally:
                emit(None)

        thread = threading.Thread(target=work, name=f"generate-{request_id}", daemon=True)
        thread.start()
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)
            if adapter is not None:
                adapter.release()

    @torch.no_grad()
    def _run(self, prompt_ids, sampling: Sampling, adapter, stop: threading.Event, emit) -> None:
        with self._lock:
            model, load_s = self.model, 0.0
            if adapter is not None:
                from peft import PeftModel

                started = time.monotonic()
                model = PeftModel.from_pretrained(self.model, adapter.path).eval()
                self._live += 1
                load_s = time.monotonic() - started
            try:
                self._decode(model, prompt_ids, sampling, stop, emit, load_s)
            finally:
                if adapter is not None:
                    model.unload()  # removes the LoRA layers; the base weights were never changed
                    self._live -= 1

    def _decode(self, model, prompt_ids, sampling: Sampling, stop: threading.Event, emit, load_s: float) -> None:
        ids = torch.tensor([prompt_ids], device=self.device)
        out = model(input_ids=ids, use_cache=True)
        prompt_lp = None
        if sampling.prompt_logprobs is not None:
            logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
            prompt_lp = [None] + [
                self._top(logp[i], prompt_ids[i + 1], sampling.prompt_logprobs) for i in range(len(prompt_ids) - 1)
            ]
        generator = torch.Generator(device=self.device)
        if sampling.seed is not None:
            generator.manual_seed(sampling.seed)
        past, logits = out.past_key_values, out.logits[0, -1]
        generated: list[int] = []
        text = ""
        first = True
        for _ in range(max(1, sampling.max_tokens)):
            if stop.is_set():
                return
            logp = torch.log_softmax(logits.float(), -1)
            token = self._sample(logp, sampling, generator)
            generated.append(token)
            full = self.tokenizer.decode(generated, skip_special_tokens=True)
            delta, text = full[len(text) :], full
            finish = None
            if token == self.tokenizer.eos_token_id:
                finish, delta = "stop", ""
            elif sampling.stop and any(s in text for s in sampling.stop):
                cut = min(text.index(s) for s in sampling.stop if s in text)
                delta = delta[: max(0, len(delta) - (len(text) - cut))]
                finish = "stop"
            elif len(generated) >= max(1, sampling.max_tokens):
                finish = "length"
            chunk = Chunk(text=delta, token_ids=[token], finish_reason=finish)
            if sampling.logprobs is not None:
                chunk.logprobs = [self._top(logp, token, sampling.logprobs)]
            if first:
                chunk.prompt_logprobs, chunk.load_adapter_s, first = prompt_lp, load_s, False
            emit(chunk)
            if finish:
                return
            out = model(input_ids=torch.tensor([[token]], device=self.device), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]

    @staticmethod
    def _top(logp: torch.Tensor, chosen: int, k: int) -> dict[int, float]:
        out = {int(chosen): float(logp[chosen])}
        if k:
            values, indices = logp.topk(k)
            for v, i in zip(values.tolist(), indices.tolist(), strict=True):
                out.setdefault(int(i), float(v))
        return out

    @staticmethod
    def _sample(logp: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
        if sampling.temperature == 0:
            return int(logp.argmax())
        probs = torch.softmax(logp / sampling.temperature, -1)
        if sampling.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < sampling.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))

    def shutdown(self) -> None:
        return None


def make_generator(model_dir: Path, config: GeneratorConfig, max_lora_rank: int, device: str) -> Generator:
    if config.engine == "vllm":
        return VLLMGenerator(model_dir, config, max_lora_rank, device)
    return TransformersGenerator(model_dir, config, device)
