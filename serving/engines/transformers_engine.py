"""`TransformersGenerator`: transformers + peft, token by token with a KV cache, one request at a time.

The fallback where vLLM cannot run, and the engine of unit tests. It implements the same sampling
settings as the vLLM engine (penalties, top-k/top-p/min-p, min_tokens, ignore_eos, stop strings, n
choices, seeds, logprobs); the adapter is loaded with peft for the request and unloaded after it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

import torch

from serving.config import GeneratorConfig
from serving.contracts import Chunk, GenerateRequest, Sampling, TokenLogprobs
from serving.engines.base import context_length, local_adapter_root

log = logging.getLogger(__name__)


def _top(logp: torch.Tensor, chosen: int, k: int) -> TokenLogprobs:
    out = {int(chosen): float(logp[chosen])}
    if k:
        values, indices = logp.topk(k)
        for v, i in zip(values.tolist(), indices.tolist(), strict=True):
            out.setdefault(int(i), float(v))
    return out


def _penalised(logits: torch.Tensor, counts: torch.Tensor, prompt_seen: torch.Tensor, s: Sampling) -> torch.Tensor:
    """vLLM's penalties: repetition (prompt and output tokens), presence and frequency (output tokens)."""
    if s.repetition_penalty != 1.0:
        seen = prompt_seen | (counts > 0)
        logits = torch.where(
            seen, torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty), logits
        )
    if s.frequency_penalty:
        logits = logits - s.frequency_penalty * counts
    if s.presence_penalty:
        logits = logits - s.presence_penalty * (counts > 0)
    return logits


def _sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    if s.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, -1)
    if s.top_k > 0:
        kth = probs.topk(min(s.top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if s.min_p > 0:
        probs = torch.where(probs >= s.min_p * probs.max(), probs, 0.0)
    if s.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < s.top_p * sorted_p.sum()
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


class TransformersGenerator:
    """transformers + peft generation with the vLLM engine's interface."""

    def __init__(self, model_dir: Path, config: GeneratorConfig, device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        self.device = device
        self.max_model_len = context_length(model_dir, config)
        self._lock = threading.Lock()
        self._live = 0
        self.adapter_root = local_adapter_root(config)

    async def loaded_adapters(self) -> int:
        return self._live

    async def check_health(self) -> None:
        return None  # in-process: if the model is gone, so is the replica

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[Chunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                self._run(list(request.prompt_ids), request.sampling, request.adapter, stop, emit)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                emit(exc)
            finally:
                emit(None)

        thread = threading.Thread(target=work, name=f"generate-{request.request_id}", daemon=True)
        thread.start()
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)

    @torch.no_grad()
    def _run(self, prompt_ids, sampling: Sampling, adapter, stop: threading.Event, emit: Callable) -> None:
        with self._lock:
            model, files, load_s = self.model, None, 0.0
            try:
                if adapter is not None:
                    from peft import PeftModel

                    started = time.monotonic()
                    files = adapter.write(self.adapter_root)
                    model = PeftModel.from_pretrained(self.model, files.path).eval()
                    self._live += 1
                    load_s = time.monotonic() - started
                for index in range(sampling.n):
                    self._decode(model, prompt_ids, sampling, index, stop, emit, load_s if index == 0 else 0.0)
            finally:
                if model is not self.model:
                    model.unload()  # removes the LoRA layers; the base weights were never changed
                    self._live -= 1
                if files is not None:
                    files.release()

    def _decode(self, model, prompt_ids, s: Sampling, index: int, stop: threading.Event, emit, load_s: float) -> None:
        ids = torch.tensor([prompt_ids], device=self.device)
        out = model(input_ids=ids, use_cache=True)
        prompt_lp = None
        if s.prompt_logprobs is not None and index == 0:
            logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
            prompt_lp = [None] + [_top(logp[i], prompt_ids[i + 1], s.prompt_logprobs) for i in range(len(ids[0]) - 1)]
        generator = torch.Generator(device=self.device)
        if s.seed is not None:
            generator.manual_seed(s.seed + index)
        else:
            generator.seed()
        vocab = out.logits.shape[-1]
        prompt_seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        prompt_seen[torch.tensor(prompt_ids, device=self.device)] = True
        counts = torch.zeros(vocab, device=self.device)
        past, logits = out.past_key_values, out.logits[0, -1].float()
        eos = self.tokenizer.eos_token_id
        generated: list[int] = []
        text, first = "", True
        limit = max(1, s.max_tokens)
        while not stop.is_set():
            logp = torch.log_softmax(logits, -1)  # reported logprobs are the model's own (vLLM's raw_logprobs)
            logits = _penalised(logits, counts, prompt_seen, s)
            if eos is not None and (s.ignore_eos or len(generated) < s.min_tokens):
                logits[eos] = float("-inf")
            token = _sample(logits, s, generator)
            generated.append(token)
            counts[token] += 1
            full = self.tokenizer.decode(generated, skip_special_tokens=s.skip_special_tokens)
            delta, text = full[len(text) :], full
            finish = None
            if token == eos and not s.ignore_eos:
                finish, delta = "stop", ""
            elif s.stop and len(generated) >= s.min_tokens and any(x in text for x in s.stop):
                hit = min(s.stop, key=lambda x: text.index(x) if x in text else len(text) + 1)
                cut = text.index(hit) + (len(hit) if s.include_stop_str_in_output else 0)
                delta = delta[: max(0, len(delta) - (len(text) - cut))]
                finish = "stop"
            elif len(generated) >= limit:
                finish = "length"
            chunk = Chunk(index=index, text=delta, token_ids=[token], finish_reason=finish)
            if s.logprobs is not None:
                chunk.logprobs = [_top(logp, token, s.logprobs)]
            if first:
                chunk.prompt_logprobs, chunk.load_adapter_s, first = prompt_lp, load_s, False
            emit(chunk)
            if finish:
                return
            out = model(input_ids=torch.tensor([[token]], device=self.device), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1].float()

    def shutdown(self) -> None:
        return None
