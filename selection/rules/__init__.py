"""Selection rules, one module each, behind one interface.

A rule is built once per batch from the conditioned kernel (before any pick) and then asked, step by
step, for each prompt's next pick. `pick` returns the picks (B,) and a bool mask (B,) that is False where
a prompt has nothing left to pick (fixed-order rules run out of candidates), or None from greedy rules,
which always have a pick.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol

import torch

from selection.kernel import ConditionedKernel
from selection.rules.nn import NearestNeighbours
from selection.rules.random import RandomOrder
from selection.rules.sift import Sift
from selection.rules.uncertainty import UncertaintySampling


class Rule(Protocol):
    """What the greedy loop needs from a selection rule."""

    def pick(self, kernel: ConditionedKernel, step: int) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def make_rule(
    method: str,
    kernel: ConditionedKernel,
    keys: Sequence[Sequence[Hashable]] | None,
    seed: int,
) -> Rule:
    """Build the rule named `method` for the batch held by `kernel`."""
    if method == "sift":
        return Sift()
    if method == "uncertainty":
        return UncertaintySampling()
    if method == "nn":
        return NearestNeighbours(kernel, keys=None, dedupe=False)
    if method == "nn_f":
        return NearestNeighbours(kernel, keys=keys, dedupe=True)
    if method == "random":
        return RandomOrder(kernel, seed=seed)
    raise ValueError(f"unknown selection method {method!r}; choose one of {', '.join(METHODS)}")


METHODS = ("sift", "nn", "nn_f", "uncertainty", "random")
