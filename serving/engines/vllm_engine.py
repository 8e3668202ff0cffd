"""`VLLMGenerator`: vLLM's AsyncLLM with a LoRA adapter per request.

Per adapted request: write the adapter's bytes to this node's tmpfs -> add_lora -> generate (streamed
as deltas) -> remove_lora -> delete the directory. vLLM's own unload does not free our files, and a
failing remove_lora must not leave them, so the directory is deleted whatever the engine says.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncGenerator
from dataclasses import asdict
from pathlib import Path

from serving.config import GeneratorConfig
from serving.contracts import Chunk, GenerateRequest, TokenLogprobs
from serving.engines.base import context_length, local_adapter_root

log = logging.getLogger(__name__)


def engine_lora_rank(adapter_rank: int) -> int:
    """The smallest `max_lora_rank` this vLLM accepts that holds adapters of `adapter_rank`.

    vLLM only accepts a fixed set of ranks for its LoRA buffers; an adapter of a smaller rank loads into
    a larger buffer, so the trainer's rank is rounded up rather than refused.
    """
    from vllm.config.lora import LoRAConfig

    allowed = sorted(_allowed_ranks(LoRAConfig))
    fits = [r for r in allowed if r >= adapter_rank]
    if not fits:
        raise ValueError(f"adapter rank {adapter_rank} exceeds the largest LoRA rank vLLM supports ({allowed[-1]})")
    return fits[0]


def _allowed_ranks(lora_config_cls) -> tuple[int, ...]:
    import typing

    hint = typing.get_type_hints(lora_config_cls, include_extras=True)["max_lora_rank"]
    return typing.get_args(hint)


def _logprob_dict(entry, chosen: int | None) -> TokenLogprobs:
    """vLLM's {token: Logprob} as {token: float}, the chosen token first."""
    out = {}
    if chosen is not None and chosen in entry:
        out[chosen] = float(entry[chosen].logprob)
    for token, lp in entry.items():
        out.setdefault(int(token), float(lp.logprob))
    return out


def engine_args(model_dir: Path, config: GeneratorConfig, adapter_rank: int, device: str, max_model_len: int):
    """vLLM's AsyncEngineArgs: sift-serve's settings, then `config.engine_args` (vLLM's own names). A name
    vLLM does not have is a ValueError naming it; vLLM checks the values when the engine starts."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(config.engine_args) - known)
    if unknown:
        raise ValueError(f"generator.engine_args: vLLM has no engine argument {', '.join(map(repr, unknown))}")
    ours = {
        "model": str(model_dir),
        "dtype": config.dtype if config.dtype != "auto" else ("float32" if device == "cpu" else "auto"),
        "max_model_len": max_model_len,
        "enable_lora": True,
        "max_lora_rank": engine_lora_rank(adapter_rank),
        "max_loras": config.max_loras,
        "max_cpu_loras": max(config.max_cpu_loras or config.max_loras, config.max_loras),
        "enforce_eager": device == "cpu",
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "disable_log_stats": True,
    }
    return AsyncEngineArgs(**{**ours, **config.engine_args})


class VLLMGenerator:
    """vLLM AsyncLLM with per-request LoRA adapters."""

    def __init__(
        self,
        model_dir: Path,
        config: GeneratorConfig,
        adapter_rank: int,
        device: str = "cpu",
        ray_metrics: bool = False,
    ) -> None:
        """`ray_metrics`: export vLLM's own metrics (`vllm:*`) as Ray metrics (under Ray Serve)."""
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm.v1.engine.async_llm import AsyncLLM

        self.max_model_len = context_length(model_dir, config)
        args = engine_args(model_dir, config, adapter_rank, device, self.max_model_len)
        loggers = None
        if ray_metrics:
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            loggers = [RayPrometheusStatLogger]
        self.engine = AsyncLLM.from_engine_args(args, stat_loggers=loggers)
        self._lora_ids = itertools.count(1)
        self.adapter_root = local_adapter_root(config)

    async def loaded_adapters(self) -> int:
        return len(await self.engine.list_loras())

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[Chunk]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        lora, files, load_s = None, None, 0.0
        try:
            if request.adapter is not None:
                started = time.monotonic()
                files = request.adapter.write(self.adapter_root)
                lora = LoRARequest(files.name, next(self._lora_ids), str(files.path))
                await self.engine.add_lora(lora)
                load_s = time.monotonic() - started
            # `Sampling` speaks SamplingParams' vocabulary, field for field.
            sampling = request.sampling
            fields = {
                **asdict(sampling),
                "max_tokens": max(1, sampling.max_tokens),
                "stop": list(sampling.stop) or None,
            }
            params = SamplingParams(**fields, output_kind=RequestOutputKind.DELTA)
            first = True
            stream = self.engine.generate(
                TokensPrompt(prompt_token_ids=list(request.prompt_ids)), params, request.request_id, lora_request=lora
            )
            async for out in stream:
                for o in out.outputs:
                    chunk = Chunk(
                        index=o.index, text=o.text, token_ids=list(o.token_ids), finish_reason=o.finish_reason
                    )
                    if o.logprobs is not None:
                        chunk.logprobs = [_logprob_dict(e, t) for e, t in zip(o.logprobs, o.token_ids, strict=False)]
                    if first:
                        chunk.load_adapter_s = load_s
                        if sampling.prompt_logprobs is not None and out.prompt_logprobs is not None:
                            chunk.prompt_logprobs = [
                                None if e is None else _logprob_dict(e, t)
                                for e, t in zip(out.prompt_logprobs, request.prompt_ids, strict=False)
                            ]
                        first = False
                    yield chunk
        finally:
            try:
                if lora is not None:
                    await asyncio.shield(self._remove(lora.lora_int_id))
            finally:
                if files is not None:
                    files.release()

    async def _remove(self, lora_id: int) -> None:
        try:
            await self.engine.remove_lora(lora_id)
        except Exception:
            log.exception("vLLM could not remove adapter %d; its directory is deleted anyway", lora_id)

    def shutdown(self) -> None:
        """Stop the engine now (idempotent); the engine object goes too, while the interpreter is whole."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
