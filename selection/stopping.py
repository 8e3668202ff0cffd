"""When adaptation stops: the one vocabulary of stop reasons, and the compute-proportional rule.

Stop before step n as soon as sigma_n > 1 / (alpha * n), where sigma_n = sqrt(sigma^2_{X_n}(x*)) is the
prompt's posterior standard deviation after n picks: the next step is only worth its compute while the
uncertainty it leaves shrinks at least as fast as 1/n. The rule is applied inside the greedy selection
loop (so no selection work is spent past the stop); the trainer trains on exactly what was selected.

`StopReason` runs from selection through training to the response's `adaptation.stop_reason`.
"""

from __future__ import annotations

from enum import StrEnum

import torch

MIN_LAMBDA = 1e-4
"""Smallest lambda' accepted. The kernel state is float32: after picking x, k_1(x, x) is about lambda',
computed as 1 - 1/(1 + lambda'), whose rounding error (~6e-8) must stay small against lambda'."""


class StopReason(StrEnum):
    """Why adaptation ended where it did."""

    DISABLED = "disabled"
    """Adaptation was off for this request (by the request or the operator)."""
    MAX_STEPS = "max_steps"
    """The step limit was reached (`max_steps`, or the selection's pick limit where that is lower)."""
    ALPHA = "alpha"
    """Adaptive SIFT: the next step's predicted uncertainty reduction no longer paid for its compute."""
    EXHAUSTED = "exhausted"
    """No candidate was left to pick (fixed-order baselines over a short candidate list)."""
    TIME_BUDGET = "time_budget"
    """The next step would have overrun the wall-clock budget."""
    CANCELLED = "cancelled"
    """The client went away."""
    ERROR = "error"
    """Training failed; the base model answered."""


def stops_before(sigma_n: float | torch.Tensor, n: int, alpha: float) -> bool | torch.Tensor:
    """True (elementwise for tensors) where step n should not be taken."""
    return sigma_n > 1.0 / (alpha * n)
