"""The benchmark's configurations: `cpu` (what runs here in about two hours) and `paper` (the SIFT paper's
scale, for a GPU)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from adapters.config import LayerScope


@dataclass(frozen=True)
class Recipe:
    """What one training step costs and how the adapter is shaped: the gain-per-second search's axes."""

    layers: LayerScope = LayerScope.ALL
    rank: int = 16
    train_tokens: int = 128
    """Tokens per step: the index's chunk size (one pick, one step)."""

    @property
    def name(self) -> str:
        return f"{self.layers}/r{self.rank}/{self.train_tokens}t"

    @classmethod
    def of(cls, fields: dict) -> Recipe:
        """The recipe from its JSON form (`dataclasses.asdict`)."""
        return cls(LayerScope(fields["layers"]), int(fields["rank"]), int(fields["train_tokens"]))


@dataclass(frozen=True)
class Search:
    """The gain-per-second search over recipes, on dev prompts, at one learning rate."""

    layers: tuple[LayerScope, ...] = (LayerScope.ALL, LayerScope.UPPER_HALF)
    ranks: tuple[int, ...] = (8, 16, 32)
    train_tokens: tuple[int, ...] = (128, 256)
    steps: int = 8
    learning_rate: float = 1.5e-3
    """The previous run's best SIFT rate (the rate is tuned afterwards, for the recipe chosen here)."""

    def recipes(self) -> list[Recipe]:
        return [Recipe(lay, r, t) for lay in self.layers for r in self.ranks for t in self.train_tokens]


@dataclass(frozen=True)
class Config:
    prompt_tokens: int
    eval_tokens: int
    max_steps: int
    """The horizon: every trained condition takes this many steps."""
    checkpoints: tuple[int, ...]
    """Steps after which an adapter is scored (0, the base model, always is)."""
    new_prompts_per_source: int
    contrast_prompts_per_domain: int
    dev_prompts: int
    """New-knowledge dev prompts (one per source, in source order): the search, the rate, the stopping rule."""
    learning_rates: tuple[float, ...]
    """The starting grid, widened by `lr_factor` past whichever edge is best, `lr_widen` times at most."""
    search: Search = field(default_factory=Search)
    lr_factor: float = 3.0
    lr_widen: int = 3
    keep_gain: float = 0.9
    """The stopping threshold is the largest that keeps this share of the horizon's gain on dev prompts."""
    tau_grid: tuple[float, ...] = tuple(float(x) for x in np.geomspace(0.002, 2.0, 41))
    context_tokens: int = 520
    """In context, the previous run's budget: four 128-token chunks and their separators."""
    model_context: int = 8192
    """The model's context window: the full-context condition fills it."""
    full_context_picks: int = 96
    """SIFT picks offered to the full-context condition (as many as fit are used)."""
    candidates: int = 200
    lambda_: float = 0.01
    bootstrap: int = 10_000
    seed: int = 0


CONFIGS = {
    "cpu": Config(
        prompt_tokens=128,
        eval_tokens=256,
        max_steps=32,
        checkpoints=(4, 8, 16, 24, 32),
        new_prompts_per_source=5,
        contrast_prompts_per_domain=4,
        dev_prompts=8,
        learning_rates=(3e-4, 1e-3, 3e-3),
    ),
    "paper": Config(
        prompt_tokens=512,
        eval_tokens=512,
        max_steps=50,
        checkpoints=(5, 10, 20, 30, 40, 50),
        new_prompts_per_source=10,
        contrast_prompts_per_domain=10,
        dev_prompts=12,
        learning_rates=(5e-5, 1e-4, 5e-4, 1e-3),
        search=Search(train_tokens=(512, 1024), steps=20, learning_rate=5e-4),
    ),
}
