"""What every engine shares: the engine-neutral sampling settings, the streamed `Chunk`, the
`Generator` protocol, and the model facts engines and the Ingress agree on (context length, the
sampling defaults in the model's `generation_config.json`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

from adapters.handle import AdapterBlob, adapter_root, cleanup_stale
from serving.config import GeneratorConfig

TokenLogprobs = dict[int, float]
"""{token id: logprob} for one position, the chosen token first, then the top alternatives."""


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling settings a request falls back to when it sets none: the model's generation_config.json
    (as vLLM does), else the OpenAI defaults."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_model(cls, model_dir: Path) -> SamplingDefaults:
        path = Path(model_dir) / "generation_config.json"
        if not path.is_file():
            return cls()
        config = json.loads(path.read_text())
        known = {f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None}
        return cls(**known)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request, engine-neutral (vLLM's SamplingParams vocabulary).

    top_k 0 and min_p 0 switch those filters off; `n` choices are sampled from one prompt (and adapter).
    """

    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    """Log-probabilities of generated tokens with this many alternatives; None for none."""
    prompt_logprobs: int | None = None
    """Log-probabilities of the prompt's tokens (echo) with this many alternatives; None for none."""


@dataclass
class Chunk:
    """A piece of one choice's streamed generation."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    """One entry per generated token in this chunk (when requested)."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """Per prompt token, None for the first (on the stream's first chunk only, when requested)."""
    load_adapter_s: float = 0.0
    """Seconds spent loading the adapter (on the stream's first chunk only)."""


class Generator(Protocol):
    """An engine: streams the chunks of `sampling.n` choices for a tokenised prompt, with the request's
    adapter when given: written to this node's adapter root, loaded, and removed from the engine and the
    disk whatever happens."""

    max_model_len: int

    def generate(
        self, request_id: str, prompt_ids: list[int], sampling: Sampling, adapter: AdapterBlob | None
    ) -> AsyncIterator[Chunk]: ...

    async def loaded_adapters(self) -> int:
        """Adapters the engine holds right now, as the engine itself reports them (for leak checks)."""
        ...

    async def check_health(self) -> None:
        """Raise when the engine can no longer answer (Ray Serve then restarts the replica)."""
        ...

    def shutdown(self) -> None: ...


def context_length(model_dir: Path, config: GeneratorConfig) -> int:
    """The generator's context length: the configured one, capped by the model's own."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(model_dir)
    return min(config.max_model_len, getattr(model_config, "max_position_embeddings", config.max_model_len))


def local_adapter_root(config: GeneratorConfig) -> Path:
    """This node's adapter directory, cleared of what dead processes of this host left behind."""
    root = adapter_root(config.adapter_dir)
    cleanup_stale(root)
    return root
