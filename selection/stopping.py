"""When adaptation stops: the one vocabulary of stop reasons, and the three early-stopping rules.

The marginal predicted-gain rule (`min_gain`, off by default). Step n trains on pick x_n; SIFT predicts
its gain as the share of the prompt's prior uncertainty that the pick removes,

    g_n = (sigma^2_{n-1}(x*) - sigma^2_n(x*)) / sigma^2_0(x*),

and a step is priced at t = `max_train_tokens`, the most it trains on. Stop before step n as soon as

    g_n < min_gain * t / 1000,

i.e. once a step no longer removes `min_gain` of the prompt's uncertainty per 1,000 tokens it trains on.
A share of the prior is a scale that carries over between corpora and embedders (an absolute sigma does
not).

The paper's compute-proportional rule, kept as an option: stop before step n as soon as
sigma_n > 1 / (alpha * n), with sigma_n = sqrt(sigma^2_n(x*)).

Both are applied inside the greedy selection loop (no selection work is spent past the stop; the pick
that fails the rule is not returned), so the trainer trains on exactly what was selected.

The gain-budget rule (`budget_steps`, the default, `DEFAULT_GAIN_BUDGET`) grants each prompt steps in
proportion to what its picks predict it can learn; it reads the variance trace of all `max_steps` picks
and keeps a prefix of them.

`StopReason` runs from selection through training to the response's `adaptation.stop_reason`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum

import torch

MIN_LAMBDA = 1e-4
"""Smallest lambda' accepted. The server's kernel state is float32 (Faiss vectors): after picking x,
k_1(x, x) is about lambda', computed as 1 - 1/(1 + lambda'), whose rounding error (~6e-8) must stay small
against lambda'."""


DEFAULT_MIN_GAIN = 0.0
"""The marginal rule is off by default: it stops soonest on the prompts whose first picks explain them
best (its steps against V: Spearman -0.79 on the quality benchmark's dev prompts), and at its earlier
calibrated threshold it lost to uniform steps (README, Quality)."""
DEFAULT_GAIN_BUDGET = 0.0267
"""The gain budget's default tau: the largest threshold that keeps 90% of the gain of all 32 steps on the
quality benchmark's new-knowledge dev prompts (README, Quality)."""


class StopReason(StrEnum):
    """Why adaptation ended where it did."""

    DISABLED = "disabled"
    """Adaptation was off for this request (by the request or the operator)."""
    MAX_STEPS = "max_steps"
    """The step limit was reached (`max_steps`, or the selection's pick limit where that is lower)."""
    MIN_GAIN = "min_gain"
    """The next step's predicted gain no longer paid for its tokens (the marginal rule)."""
    ALPHA = "alpha"
    """The paper's rule: sigma_n > 1/(alpha n)."""
    GAIN_BUDGET = "gain_budget"
    """The gain-budget rule granted fewer steps than picks (`budget_steps`)."""
    EXHAUSTED = "exhausted"
    """No candidate was left to pick (fixed-order baselines over a short candidate list)."""
    TIME_BUDGET = "time_budget"
    """The next step would have overrun the wall-clock budget."""
    CANCELLED = "cancelled"
    """The client went away."""
    DIVERGED = "diverged"
    """Training produced a non-finite loss or weights; the adapter was discarded and the base model answered."""
    ERROR = "error"
    """Training failed; the base model answered."""


def stops_before(sigma_n: float | torch.Tensor, n: int, alpha: float) -> bool | torch.Tensor:
    """True (elementwise for tensors) where step n should not be taken."""
    return sigma_n > 1.0 / (alpha * n)


def budget_steps(sigma2: Sequence[float], tau: float, max_steps: int, prior: float | None = None) -> int:
    """Steps granted by the gain-budget rule, from the variance trace of the first `max_steps` picks.

    The rule predicts a prompt's realised gain from how much of its uncertainty the picks remove in all,
    V = 1 - sigma^2_K / sigma^2_0 (K = `max_steps`, or fewer picks where fewer exist), and assumes every
    prompt's gain grows like V log(1 + n) with the steps n: concave, and larger for prompts the picks
    explain better. Step n's predicted gain is then V log(1 + 1/n); steps are granted while it is at least
    `tau`:

        n* = min(K, floor(1 / (exp(tau / V) - 1)))

    Unlike the marginal rule (`min_gain`), which stops as soon as the next pick adds little *new*
    information, and so stops soonest on the prompts whose first picks explain them best, this rule gives
    the most steps to the prompts with the most to learn.

    `prior` is the prompt's whole uncertainty where the trace starts after documents already trained on
    (a conversation's earlier turns): V = (sigma^2_0 - sigma^2_K) / prior, the share of the prompt's
    uncertainty that the new picks remove, so what earlier turns learned earns no new steps."""
    if len(sigma2) < 2 or sigma2[0] <= 0:
        return 0
    k = min(max_steps, len(sigma2) - 1)
    total = (sigma2[0] - sigma2[k]) / (prior if prior is not None and prior > 0 else sigma2[0])
    if total <= 0:
        return 0
    if tau <= 0:
        return k
    ratio = tau / total
    if ratio > 50:  # exp overflows long before; no step is worth it
        return 0
    return min(k, math.floor(1.0 / math.expm1(ratio)))


def step_threshold(min_gain: float, step_tokens: int) -> float:
    """The least share of the prior variance one step of `step_tokens` tokens must remove."""
    return min_gain * step_tokens / 1000.0


def gain_stops_before(
    prior: torch.Tensor, before: torch.Tensor, after: torch.Tensor, min_step_gain: float
) -> torch.Tensor:
    """True (elementwise) where the pick taking the variance from `before` to `after` removes less than
    `min_step_gain` of the `prior` variance."""
    return (before - after) < min_step_gain * prior
