"""Selection rules, one module each, behind one interface.

A rule is built once per batch from the conditioned kernel (before any pick) and then asked, step by
step, for each prompt's next pick. `pick` returns the picks (B,) and a bool mask (B,) that is False where
a prompt has nothing left to pick (fixed-order rules run out of candidates), or None from greedy rules,
which always have a pick.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from enum import StrEnum
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


class Method(StrEnum):
    """The selection rules by name: the one vocabulary the API, the configuration and the benchmarks use."""

    SIFT = "sift"
    NN = "nn"
    NN_F = "nn_f"
    UNCERTAINTY = "uncertainty"
    RANDOM = "random"

    @classmethod
    def parse(cls, name: str) -> Method:
        """The rule called `name`, or a ValueError that lists the rules."""
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown selection method {name!r}; choose one of {', '.join(cls)}") from None


def make_rule(
    method: Method,
    kernel: ConditionedKernel,
    keys: Sequence[Sequence[Hashable]] | None,
    seed: int,
) -> Rule:
    """Build the rule `method` (parsed by the caller, `Method.parse`) for the batch held by `kernel`."""
    match method:
        case Method.SIFT:
            return Sift()
        case Method.UNCERTAINTY:
            return UncertaintySampling()
        case Method.NN:
            return NearestNeighbours(kernel, keys=None, dedupe=False)
        case Method.NN_F:
            return NearestNeighbours(kernel, keys=keys, dedupe=True)
        case Method.RANDOM:
            return RandomOrder(kernel, seed=seed)
