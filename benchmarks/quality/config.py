"""The benchmark's configurations: `cpu` (what runs here) and `paper` (the SIFT paper's protocol)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Config:
    prompt_tokens: int
    eval_tokens: int
    train_tokens: int
    max_steps: int
    checkpoints: tuple[int, ...]
    prompts_per_domain: int
    dev_prompts_per_domain: int
    sweep_prompts: int
    learning_rates: tuple[float, ...]
    duplicate_prompts_per_domain: int
    random_prompts_per_domain: int
    seed_prompts_per_domain: int
    keep_gain: float = 0.9
    min_gain_grid: tuple[float, ...] = tuple(float(x) for x in np.geomspace(0.002, 2.0, 31))
    context_tokens: int = 520
    """In-context methods: the most prompt tokens the documents may add (four 128-token chunks and their
    separators)."""
    candidates: int = 200
    lambda_: float = 0.01
    rank: int = 16


CONFIGS = {
    "cpu": Config(
        prompt_tokens=128,
        eval_tokens=256,
        train_tokens=128,
        max_steps=16,
        checkpoints=(1, 2, 4, 8, 12, 16),
        prompts_per_domain=6,
        dev_prompts_per_domain=2,
        sweep_prompts=3,
        learning_rates=(2e-4, 5e-4, 1.5e-3),
        duplicate_prompts_per_domain=3,
        random_prompts_per_domain=3,
        seed_prompts_per_domain=1,
    ),
    "paper": Config(
        prompt_tokens=512,
        eval_tokens=512,
        train_tokens=1024,
        max_steps=50,
        checkpoints=(1, 2, 5, 10, 20, 30, 40, 50),
        prompts_per_domain=20,
        dev_prompts_per_domain=5,
        sweep_prompts=10,
        learning_rates=(5e-5, 1e-4, 5e-4, 1e-3),
        duplicate_prompts_per_domain=10,
        random_prompts_per_domain=10,
        seed_prompts_per_domain=3,
    ),
}

UNSEEN_DOMAIN = "releases"
"""The domain of text written after the base model's release."""
