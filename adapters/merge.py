"""Test-time model merging (Bertolissi, Hübotter, Hakimi, Krause, COLM 2025): weigh expert adapters by how
close the prompt is to each expert's key, and sum their LoRA deltas into one adapter.

Weights (the sparse kernel of the authors' `ttmerge`): with c_k = cos(prompt, key_k),

    u_k = exp(-(1 - c_k) / beta^2),    p_k = u_k / sum_j u_j,

keep the experts with p_k > tau (the `threshold`), at most M of them (the largest), and renormalise:
w_k = p_k / sum_{j kept} p_j. No expert clears tau: no merge (the base model). The p_k are a softmax,
computed stably, so a small beta never underflows into NaN (where ttmerge falls back to the nearest
expert alone, this gives the exact limit, which is the same expert when it is the only one near).

Merge: per adapted projection, expert k's delta is s_k B_k A_k (s_k = lora_alpha_k / r_k), and

    dW = sum_k w_k s_k B_k A_k = [w_1 s_1 B_1 | ... | w_K s_K B_K] [A_1; ...; A_K]

is exactly one LoRA of rank sum_k r_k with scaling 1 (`concatenate`). Above the rank the engine takes,
`adapters.low_rank.truncate` cuts it through its factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class MergeOptions:
    """How one request's experts are weighed and merged (resolved: every value is the one used)."""

    beta: float = 0.2
    """Kernel width: smaller trusts the nearest experts more."""
    threshold: float = 0.01
    """tau: an expert whose normalised weight is at most this is left out."""
    max_experts: int = 50
    """M: most experts merged."""
    rank: int = 32
    """Most rank of the merged adapter; above it, the merge is truncated (and the error reported)."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.max_experts < 1:
            raise ValueError(f"max_experts must be >= 1, got {self.max_experts}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")


@dataclass(frozen=True)
class ExpertWeight:
    """Expert `expert` enters the merge with weight `weight` (the kept weights sum to 1)."""

    expert: int
    weight: float


def expert_weights(query: np.ndarray, keys: np.ndarray, options: MergeOptions) -> list[ExpertWeight]:
    """The experts merged for a prompt embedded as `query` (d,), given the experts' unit keys (E, d):
    the kept experts, heaviest first (empty when none clears the threshold)."""
    query = np.asarray(query, dtype=np.float64)
    norm = np.linalg.norm(query)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("the query embedding must be finite and non-zero")
    logits = -(1.0 - np.asarray(keys, dtype=np.float64) @ (query / norm)) / options.beta**2
    p = np.exp(logits - logits.max())
    p /= p.sum()
    kept = np.flatnonzero(p > options.threshold)
    kept = kept[np.argsort(-p[kept], kind="stable")][: options.max_experts]
    total = p[kept].sum()
    return [ExpertWeight(int(k), float(p[k] / total)) for k in kept]


def concatenate(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], scales: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One projection's merged factors (A (sum r_k, in), B (out, sum r_k)) with B A = sum_k scale_k B_k A_k,
    from the experts' A_k (r_k, in) and B_k (out, r_k); each scale is w_k s_k."""
    if not (len(a) == len(b) == len(scales)) or not a:
        raise ValueError("concatenate needs one A, one B and one scale per expert, and at least one expert")
    merged_a = torch.cat(list(a), dim=0)
    merged_b = torch.cat([bk * float(scale) for bk, scale in zip(b, scales, strict=True)], dim=1)
    return merged_a, merged_b
