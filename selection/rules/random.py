"""Random selection: a uniformly random order of each prompt's candidates, without repeats, seeded.

Each prompt draws from its own generator seeded with `seed`, so a prompt's picks do not depend on which
other prompts share its batch.
"""

from __future__ import annotations

import torch

from selection.kernel import ConditionedKernel


class RandomOrder:
    """Candidates in a random order drawn once per prompt, reproducible from the seed."""

    def __init__(self, kernel: ConditionedKernel, seed: int) -> None:
        batch, k = kernel.candidate_mask.shape
        self.counts = kernel.candidate_mask.sum(-1)
        order = torch.zeros(batch, k, dtype=torch.long)
        for b in range(batch):
            count = int(self.counts[b])
            order[b, :count] = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        self.order = order.to(kernel.candidate_mask.device)

    def pick(self, kernel: ConditionedKernel, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if step >= self.order.shape[1]:
            return self.order[:, 0], torch.zeros_like(self.counts, dtype=torch.bool)
        return self.order[:, step], step < self.counts
