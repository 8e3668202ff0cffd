"""Nearest neighbours (NN) and NN without duplicates (NN-F).

NN ranks candidates once by their relevance to the prompt, sum_j k(t_j, x)^2 (|cos| for one normalised
target, the same score SIFT's first pick maximises), and takes them in that order, each at most once.
NN-F skips a candidate whose text duplicates one already taken: by the caller's keys (e.g. text hashes)
when given, else by identical embedding vectors.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from selection.kernel import ConditionedKernel


def _duplicate_keys(candidates: torch.Tensor, count: int) -> list[Hashable]:
    """A key per candidate that is equal exactly when the embedding vectors are equal."""
    return [candidates[i].cpu().numpy().tobytes() for i in range(count)]


class NearestNeighbours:
    """Fixed order by prior relevance, stable (ties to the lower index), optionally without duplicates."""

    def __init__(
        self,
        kernel: ConditionedKernel,
        keys: Sequence[Sequence[Hashable]] | None,
        dedupe: bool,
    ) -> None:
        relevance = kernel.prior_similarity.masked_fill(~kernel.candidate_mask, -1.0)
        order = torch.sort(relevance, dim=-1, descending=True, stable=True).indices
        counts = kernel.candidate_mask.sum(-1)
        if dedupe:
            rows = []
            for b in range(order.shape[0]):
                count = int(counts[b])
                prompt_keys = keys[b] if keys is not None else _duplicate_keys(kernel.candidate_vectors(b), count)
                if len(prompt_keys) != count:
                    raise ValueError(f"prompt {b}: {len(prompt_keys)} keys for {count} candidates")
                seen: set[Hashable] = set()
                kept = []
                for i in order[b, :count].tolist():
                    if prompt_keys[i] not in seen:
                        seen.add(prompt_keys[i])
                        kept.append(i)
                rows.append(kept)
            counts = torch.tensor([len(r) for r in rows], device=order.device)
            order = torch.zeros_like(order)
            for b, kept in enumerate(rows):
                order[b, : len(kept)] = torch.tensor(kept, device=order.device)
        self.order = order
        self.counts = counts

    def pick(self, kernel: ConditionedKernel, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if step >= self.order.shape[1]:
            return self.order[:, 0], torch.zeros_like(self.counts, dtype=torch.bool)
        return self.order[:, step], step < self.counts
