"""Truncating a low-rank product B A (B: out x R, A: R x in) to rank k without forming the dense matrix.

With thin QR factorisations B = Q_B R_B and A^T = Q_A R_A, the product is B A = Q_B (R_B R_A^T) Q_A^T, and
Q_B, Q_A have orthonormal columns, so the singular values of B A are those of the small R x R core
C = R_B R_A^T. With C = U S V^T, the best rank-k approximation (Eckart-Young, in Frobenius and spectral
norm) is Q_B U_k S_k V_k^T Q_A^T, returned balanced as B' = Q_B U_k S_k^(1/2), A' = S_k^(1/2) V_k^T Q_A^T
(equal norms on both sides: a good starting point for further training). The relative Frobenius error is

    ||B A - B' A'||_F / ||B A||_F = sqrt(sum_{i>k} s_i^2) / sqrt(sum_i s_i^2).

Cost O((out + in) R^2 + R^3): never out x in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Truncated:
    """Factors of rank at most k, and the squared Frobenius norms of what was dropped and of the whole."""

    a: torch.Tensor
    b: torch.Tensor
    dropped: float
    """||B A - B' A'||_F^2"""
    total: float
    """||B A||_F^2"""

    @property
    def relative_error(self) -> float:
        return (self.dropped / self.total) ** 0.5 if self.total > 0 else 0.0


def truncate(a: torch.Tensor, b: torch.Tensor, rank: int) -> Truncated:
    """B A cut to rank `rank` through its factors (as they are when their rank is already at most `rank`)."""
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"need A (R, in) and B (out, R), got A {tuple(a.shape)} and B {tuple(b.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    dtype = a.dtype
    a64, b64 = a.double(), b.double()
    q_b, r_b = torch.linalg.qr(b64)
    q_a, r_a = torch.linalg.qr(a64.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    total = float((s**2).sum())
    if a.shape[0] <= rank:
        return Truncated(a, b, 0.0, total)
    root = s[:rank].sqrt()
    new_b = (q_b @ u[:, :rank]) * root
    new_a = root[:, None] * (vh[:rank] @ q_a.T)
    return Truncated(new_a.to(dtype), new_b.to(dtype), float((s[rank:] ** 2).sum()), total)
