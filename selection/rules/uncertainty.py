"""Uncertainty sampling: pick the candidate the conditioned kernel is least sure about, argmax k_n(x, x).

It ignores the prompt beyond the candidate set the index retrieved for it; a baseline for SIFT.
"""

from __future__ import annotations

import torch

from selection.kernel import ConditionedKernel
from selection.rules.sift import masked_argmax


class UncertaintySampling:
    """Greedy maximum posterior variance of the candidates themselves."""

    def pick(self, kernel: ConditionedKernel, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        picks = masked_argmax(kernel.kxx, kernel.candidate_mask)
        return picks, torch.ones_like(picks, dtype=torch.bool)
