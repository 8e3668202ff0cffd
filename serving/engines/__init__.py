"""The engines that answer, one module each, behind the `Generator` protocol (`base`).

`vllm_engine.VLLMGenerator` is the primary engine (vLLM's AsyncLLM with per-request LoRA);
`transformers_engine.TransformersGenerator` is the fallback where vLLM cannot run and the engine of
unit tests. `make_generator` picks one from the configuration.
"""

from __future__ import annotations

from pathlib import Path

from infra.config import resolve_device
from serving.config import GeneratorConfig
from serving.contracts import Chunk, Sampling, SamplingDefaults
from serving.engines.base import Generator, context_length

__all__ = ["Chunk", "Generator", "Sampling", "SamplingDefaults", "context_length", "make_generator"]


def make_generator(model_dir: Path, config: GeneratorConfig, adapter_rank: int, ray_metrics: bool = False) -> Generator:
    """The configured engine over `model_dir` on `config.device`, able to load adapters of rank
    `adapter_rank`; with `ray_metrics`, vLLM's own metrics are exported as Ray metrics."""
    device = resolve_device(config.device)
    if config.engine == "vllm":
        from serving.engines.vllm_engine import VLLMGenerator

        return VLLMGenerator(model_dir, config, adapter_rank, device, ray_metrics)
    from serving.engines.transformers_engine import TransformersGenerator

    return TransformersGenerator(model_dir, config, device)
