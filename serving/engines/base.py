"""What every engine shares: the `Generator` protocol (a `GenerateRequest` in, `Chunk`s out; both in
`serving.contracts`), and the model facts engines and the Ingress agree on (context length, the node's
adapter directory)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Protocol

from adapters.handle import adapter_root, cleanup_stale
from serving.config import GeneratorConfig
from serving.contracts import Chunk, GenerateRequest


class Generator(Protocol):
    """An engine: streams the chunks of `sampling.n` choices for a tokenised prompt, with the request's
    adapter when given: written to this node's adapter root, loaded, and removed from the engine and the
    disk whatever happens."""

    max_model_len: int

    def generate(self, request: GenerateRequest) -> AsyncGenerator[Chunk]: ...

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
