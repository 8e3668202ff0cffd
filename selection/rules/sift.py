"""SIFT: pick the candidate that most reduces the targets' posterior variance.

x_{n+1} = argmax_x sum_j k_n(t_j, x)^2 / (k_n(x, x) + lambda'), which is argmin of the summed
posterior variance sigma^2_{X_n + x}(x*). A candidate may be picked again; ties go to the lowest index.
"""

from __future__ import annotations

import torch

from selection.kernel import ConditionedKernel


def first_argmax(scores: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Row-wise argmax of scores (non-negative where real); ties go to the lowest index; NaN never wins.

    Exact copies of a document tie in exact arithmetic but can differ in the last bits after a matrix
    product, so scores within `tolerance` (relative) of the maximum count as tied.
    """
    scores = scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    tied = scores >= scores.amax(-1, keepdim=True) * (1.0 - tolerance)
    return tied.byte().argmax(-1)  # argmax returns the first maximal index


class Sift:
    """Greedy variance-minimising selection (the paper's VTL with a linear kernel)."""

    def pick(self, kernel: ConditionedKernel, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return first_argmax(kernel.variance_reduction(), kernel.tie_tolerance), None
