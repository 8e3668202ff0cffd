"""The conditioned kernel behind every selection rule, batched over prompts.

For a batch of B prompts, each with up to m target embeddings and up to K candidate embeddings, this
keeps the linear kernel k(x, x') = phi(x)^T phi(x') conditioned on the picks so far:

    k_i(a, b) = k_{i-1}(a, b) - k_{i-1}(a, x_i) k_{i-1}(x_i, b) / (k_{i-1}(x_i, x_i) + lambda')

Only the quantities a rule needs are stored: k_n(x, x) and k_n(t_j, x) for every candidate x and
target t_j, and k_n(t_j, t_j). A pick costs O(K d + K n) (one kernel column, then the n earlier
rank-one corrections), never a rebuild of a K x K covariance.
"""

from __future__ import annotations

import torch


class ConditionedKernel:
    """Batched, incrementally conditioned linear kernel over candidates and targets."""

    def __init__(
        self,
        targets: torch.Tensor,
        target_mask: torch.Tensor,
        candidates: torch.Tensor,
        candidate_mask: torch.Tensor,
        lambda_: float,
        max_picks: int,
    ) -> None:
        """targets (B, m, d), candidates (B, K, d); masks are bool and mark real (unpadded) rows."""
        self.candidates = candidates
        self.candidate_mask = candidate_mask
        self.lambda_ = lambda_
        tmask = target_mask.to(candidates.dtype)
        # k_n(x, x) per candidate, k_n(t_j, x) per target and candidate, k_n(t_j, t_j) per target.
        self.kxx = (candidates * candidates).sum(-1)
        self.ktx = torch.bmm(targets, candidates.transpose(1, 2)) * tmask.unsqueeze(-1)
        self.ktt = (targets * targets).sum(-1) * tmask
        batch, k = candidate_mask.shape
        # Row i holds v_i(x) = k_{i-1}(x_i, x) / sqrt(k_{i-1}(x_i, x_i) + lambda') for every candidate x.
        self._v = candidates.new_zeros(batch, max_picks, k)
        self.n = 0

    @property
    def prior_similarity(self) -> torch.Tensor:
        """Sum over targets of k_0(t_j, x)^2, the relevance NN ranks by; (B, K). Valid before any pick."""
        return (self.ktx * self.ktx).sum(1)

    def variance(self) -> torch.Tensor:
        """sigma^2_{X_n}(x*): posterior variance of the targets, summed over them; (B,)."""
        return self.ktt.sum(-1)

    def variance_reduction(self) -> torch.Tensor:
        """sum_j k_n(t_j, x)^2 / (k_n(x, x) + lambda') for every candidate; (B, K)."""
        return (self.ktx * self.ktx).sum(1) / (self.kxx + self.lambda_)

    def condition(self, picks: torch.Tensor, active: torch.Tensor) -> None:
        """Condition each active prompt's kernel on its pick (picks: (B,) long, active: (B,) bool)."""
        rows = torch.arange(picks.shape[0], device=picks.device)
        picked = self.candidates[rows, picks]  # (B, d)
        column = torch.bmm(self.candidates, picked.unsqueeze(-1)).squeeze(-1)  # k_0(x_i, x), (B, K)
        if self.n:
            earlier = self._v[:, : self.n]  # (B, n, K)
            column = column - torch.bmm(earlier[rows, :, picks].unsqueeze(1), earlier).squeeze(1)
        scale = active.to(column.dtype) / torch.sqrt(self.kxx[rows, picks] + self.lambda_)
        v = column * scale.unsqueeze(-1)  # (B, K)
        vt = self.ktx[rows, :, picks] * scale.unsqueeze(-1)  # (B, m)
        self._v[:, self.n] = v
        self.n += 1
        self.kxx = self.kxx - v * v
        self.ktx = self.ktx - vt.unsqueeze(-1) * v.unsqueeze(1)
        self.ktt = self.ktt - vt * vt
