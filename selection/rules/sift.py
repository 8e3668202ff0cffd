"""SIFT: pick the candidate that most reduces the targets' posterior variance.

x_{n+1} = argmax_x sum_j k_n(t_j, x)^2 / (k_n(x, x) + lambda'), which is argmin of the summed
posterior variance sigma^2_{X_n + x}(x*). A candidate may be picked again; ties go to the lowest index.
"""

from __future__ import annotations

import torch

from selection.kernel import ConditionedKernel


def masked_argmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax over real candidates; ties go to the lowest index.

    Exact copies of a document tie in exact arithmetic but can differ in the last bits after a matrix
    product, so scores within a relative 1e4 machine epsilons of the maximum count as tied.
    """
    scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
    best = scores.max(-1, keepdim=True).values
    tied = scores >= best - 1e4 * torch.finfo(scores.dtype).eps * best.abs()
    return tied.to(torch.uint8).argmax(-1)  # argmax returns the first maximal index


class Sift:
    """Greedy variance-minimising selection (the paper's VTL with a linear kernel)."""

    def pick(self, kernel: ConditionedKernel, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        picks = masked_argmax(kernel.variance_reduction(), kernel.candidate_mask)
        return picks, torch.ones_like(picks, dtype=torch.bool)
