"""Paired statistics for the quality benchmark: is method A better than method B on the same prompts?

For per-prompt scores a_i and b_i (bits per byte, lower is better) the paired differences d_i = a_i - b_i
are summarised by their mean, a BCa bootstrap 95% confidence interval of the mean (10,000 resamples,
seeded) and the exact two-sided Wilcoxon signed-rank p-value (zero differences dropped, as Wilcoxon
proposed). A comparison is a win only where the interval excludes zero. Rank correlations get a
percentile bootstrap interval over prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

RESAMPLES = 10_000


@dataclass(frozen=True)
class Paired:
    """The paired comparison of A against B (differences A - B; negative favours A when lower is better)."""

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    a_better: int
    """Prompts where A scored lower than B."""
    b_better: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _mean_ci(d: np.ndarray) -> tuple[float, float]:
    if len(d) < 2 or np.all(d == d[0]):
        return float(d.mean()), float(d.mean())
    res = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=RESAMPLES, method="BCa", random_state=0)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Mean of a - b with its bootstrap CI and the exact Wilcoxon signed-rank p-value."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(d) == 0:
        raise ValueError("no paired scores")
    nonzero = d[d != 0]
    p = 1.0 if len(nonzero) == 0 else float(stats.wilcoxon(nonzero, method="exact").pvalue)
    low, high = _mean_ci(d)
    return Paired(
        n=len(d),
        mean_diff=float(d.mean()),
        ci_low=low,
        ci_high=high,
        p_value=p,
        a_better=int((d < 0).sum()),
        b_better=int((d > 0).sum()),
    )


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, float | int]:
    """Spearman's rank correlation of x and y with a percentile bootstrap 95% CI over the pairs."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rho = float(stats.spearmanr(x, y).statistic)
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(RESAMPLES // 10):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            draws.append(stats.spearmanr(x[i], y[i]).statistic)
    low, high = np.percentile(draws, [2.5, 97.5]) if draws else (rho, rho)
    return {"n": len(x), "rho": rho, "ci_low": float(low), "ci_high": float(high)}
