"""Uncertainty sampling: pick the candidate the conditioned kernel is least sure about, argmax k_n(x, x).

It ignores the prompt beyond the candidate set the index retrieved for it; a baseline for SIFT.
"""

from __future__ import annotations

import torch

from selection.kernel import ConditionedKernel
from selection.rules.sift import first_argmax


class UncertaintySampling:
    """Greedy maximum posterior variance of the candidates themselves."""

    def pick(self, kernel: ConditionedKernel, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return first_argmax(kernel.kxx_lambda, kernel.tie_tolerance), None  # same order as k_n(x, x)
