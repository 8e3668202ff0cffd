"""Configuration of the test-time trainer (a section of `serving.config.Settings`): the adapter's shape and
the training engine's. How long and how fast one request trains is per request (`adapters.spec.TrainSpec`)."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from infra.config import Strict

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LayerScope(StrEnum):
    """Which decoder layers carry LoRA weights."""

    ALL = "all"
    UPPER_HALF = "upper_half"
    """The upper half of the layers: the backward pass stops halfway down, so a step costs less."""

    def layers(self, count: int) -> list[int] | None:
        """The adapted layers' indices out of `count` (None: all of them)."""
        return None if self is LayerScope.ALL else list(range(count // 2, count))


class TrainerConfig(Strict):
    """The adapters the trainer fits (LoRA shape, optimizer) and where it runs."""

    rank: int = Field(8, gt=0, le=256, description="LoRA rank (8: the quality benchmark's best gain per second)")
    lora_alpha: float = Field(32.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    layers: LayerScope = Field(
        LayerScope.UPPER_HALF,
        description="the decoder layers adapted: all, or the upper half (the quality benchmark's best gain per "
        "second: the backward pass stops halfway)",
    )
    weight_decay: float = Field(0.0, ge=0)
    device: str = Field("cpu", description="cpu, cuda, cuda:0, ... or auto (CUDA when the replica sees a GPU)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU that supports it, else float32"
    )
    max_batch: int = Field(4, gt=0, le=256, description="requests trained together in one forward/backward")
    max_waiting: int = Field(64, gt=0, description="requests that may wait for a slot before refusal")
    seed: int = Field(0, ge=0, lt=2**63, description="seeds each adapter's initialisation")
    cache_bytes: int = Field(
        256 * 2**20,
        ge=0,
        description="adapter weights kept to reuse identical training (same documents and options), least "
        "recently used out first; 0: off",
    )
