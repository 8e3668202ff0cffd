"""The conditioned kernel behind every selection rule, batched over prompts.

For a batch of B prompts, each with up to m target embeddings and up to K candidate embeddings, this
keeps the linear kernel k(x, x') = phi(x)^T phi(x') conditioned on the picks so far:

    k_i(a, b) = k_{i-1}(a, b) - k_{i-1}(a, x_i) k_{i-1}(x_i, b) / (k_{i-1}(x_i, x_i) + lambda')

Only what the rules need is stored: k_n(x, x) + lambda' and k_n(t_j, x) for every candidate x and
target t_j, k_n(t_j, t_j), and the vectors v_i(x) = k_{i-1}(x_i, x) / sqrt(k_{i-1}(x_i, x_i) + lambda')
of the picks so far. A pick costs O(K d + K N) (one kernel column and the earlier rank-one
corrections), never a rebuild of a K x K covariance.

On small problems the cost is the number of tensor operations per pick, not flops, so the state lives
in one (B, 1 + m + N, K) tensor: one gather reads everything about a pick, and updates are in place.
"""

from __future__ import annotations

import torch


class ConditionedKernel:
    """Batched, incrementally conditioned linear kernel over candidates and targets.

    Padded candidates (mask False) get k(x, x) + lambda' = -1 and k(t, x) = 0, and stay so: every rule's
    score ranks them at or below any real candidate (SIFT's score is -inf there), and ties go to the
    lower (real) index, so padding is never picked.
    """

    def __init__(
        self,
        targets: torch.Tensor,
        target_mask: torch.Tensor,
        candidates: torch.Tensor,
        candidate_mask: torch.Tensor,
        lambda_: float,
        max_picks: int,
        embedding_dtype: torch.dtype | None = None,
    ) -> None:
        """targets (B, m, d), candidates (B, K, d), zero where padded; masks are bool, True for real rows.

        `embedding_dtype` is the precision the embeddings came in (default: the candidates' dtype);
        kernel columns are computed in it (float32 from Faiss is 2.5x faster here), the state in the
        candidates' dtype.
        """
        embedding_dtype = embedding_dtype or candidates.dtype
        self.dtype = candidates.dtype
        self.candidate_mask = candidate_mask
        self._padding = ~candidate_mask
        self.lambda_ = lambda_
        # Scores this close (relative) to the best count as tied: rounding noise of the kernel columns, and
        # of the conditioned denominators k_n(x, x) + lambda', whose absolute error ~eps * k_0(x, x) is
        # relative error ~eps / lambda' once they shrink towards lambda' (clamped there).
        eps = torch.finfo(embedding_dtype).eps
        self.tie_tolerance = 1e4 * torch.finfo(torch.float64).eps + 64 * eps + 4 * eps / lambda_
        batch, k, d = candidates.shape
        m = targets.shape[1]
        device = candidates.device
        # (B, d, K): a kernel column is a row-vector times matrix product, the fast layout for bmm.
        self._candidates_t = candidates.transpose(1, 2).to(embedding_dtype).contiguous()
        state = candidates.new_zeros(batch, 1 + m + max_picks, k)
        state[:, 0] = torch.where(candidate_mask, (candidates * candidates).sum(-1) + lambda_, -1.0)
        state[:, 1 : 1 + m] = torch.bmm(targets, candidates.transpose(1, 2))  # zero rows for padded targets
        self._state = state
        self._kxx_lambda = state[:, :1]  # (B, 1, K)
        self._ktx = state[:, 1 : 1 + m]  # (B, m, K)
        self._v = state[:, 1 + m :]  # (B, N, K), row i = v_i, zero until pick i
        self._v_rows = [state[:, 1 + m + i : 2 + m + i] for i in range(max_picks)]
        self._split = (1, m, max_picks)
        self.ktt = (targets * targets).sum(-1)  # (B, m); replaced (not mutated) at each pick
        # Flat offsets of (b, 0, 0) in the state and (b, j, 0) in the candidates, for one-op gathers.
        rows = 1 + m + max_picks
        self._state_index = (torch.arange(batch, device=device) * (rows * k))[:, None] + torch.arange(
            rows, device=device
        ) * k
        self._candidate_index = torch.arange(batch * d, device=device).view(batch, d) * k
        self.n = 0

    @property
    def kxx_lambda(self) -> torch.Tensor:
        """k_n(x, x) + lambda' for every candidate (-1 for padding); (B, K)."""
        return self._kxx_lambda[:, 0]

    @property
    def ktx(self) -> torch.Tensor:
        """k_n(t_j, x) for every target and candidate; (B, m, K)."""
        return self._ktx

    def candidate_vectors(self, b: int) -> torch.Tensor:
        """Prompt b's candidate embeddings, (K, d), padding included."""
        return self._candidates_t[b].T

    @property
    def prior_similarity(self) -> torch.Tensor:
        """Sum over targets of k_0(t_j, x)^2, the relevance NN ranks by; (B, K). Valid before any pick."""
        return self._ktx.square().sum(1)

    def variance(self) -> torch.Tensor:
        """sigma^2_{X_n}(x*): posterior variance of the targets, summed over them; (B,)."""
        return self.ktt.sum(-1)

    def variance_reduction(self) -> torch.Tensor:
        """sum_j k_n(t_j, x)^2 / (k_n(x, x) + lambda') for every candidate, -inf for padding; (B, K).

        The denominator is clamped at lambda' (its exact lower bound), so rounding can never divide by ~0.
        """
        scores = self._ktx.square().sum(1).div_(self._kxx_lambda[:, 0].clamp_min(self.lambda_))
        return scores.masked_fill_(self._padding, float("-inf"))

    def variance_reduction_at(self, picks: torch.Tensor) -> torch.Tensor:
        """`variance_reduction` for one candidate per prompt; (B,)."""
        kx, tx, _ = torch.take(self._state, self._state_index + picks[:, None]).split(self._split, dim=1)
        return tx.square().sum(-1, keepdim=True).div_(kx.clamp_min(self.lambda_))[:, 0]

    def condition(self, picks: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Condition each prompt's kernel on its pick (picks: (B,) long); inactive prompts are left as is."""
        at = picks[:, None]
        kx, tx, past = torch.take(self._state, self._state_index + at).split(self._split, dim=1)
        picked = torch.take(self._candidates_t, self._candidate_index + at)  # (B, d)
        column = torch.bmm(picked.unsqueeze(1), self._candidates_t)  # k_0(x_i, x), (B, 1, K)
        if column.dtype != self.dtype:
            column = column.to(self.dtype)
        if self.n:  # rows of v not yet picked are zero, so the full product is the sum over earlier picks
            column = torch.baddbmm(column, past.unsqueeze(1), self._v, alpha=-1)
        scale = kx.clamp_min(self.lambda_).rsqrt()  # (B, 1)
        if active is not None:
            scale = scale * active.unsqueeze(1)
        v = column * scale.unsqueeze(2)  # (B, 1, K)
        vt = tx * scale  # (B, m)
        self._v_rows[self.n].copy_(v)
        self.n += 1
        self._kxx_lambda.addcmul_(v, v, value=-1)
        self._ktx.addcmul_(vt.unsqueeze(2), v, value=-1)
        self.ktt = torch.addcmul(self.ktt, vt, vt, value=-1)
