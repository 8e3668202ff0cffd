"""Paired statistics for the quality benchmark: is method A better than method B on the same prompts?

For per-prompt scores a_i and b_i (bits per byte, lower is better) the paired differences d_i = a_i - b_i
are summarised by their mean, a BCa bootstrap 95% confidence interval of the mean (10,000 resamples,
seeded) and the exact two-sided Wilcoxon signed-rank p-value (zero differences dropped, as Wilcoxon
proposed). A comparison is a win only where the interval excludes zero. Rank correlations get a
percentile bootstrap interval over prompts.

Where prompts come in clusters (several prompts from one source share its style and vocabulary), the
prompt-level tests overstate the evidence: `clustered` tests the mean difference with the cluster as the
unit (a sign-flip permutation test, a bootstrap over clusters, leave-one-cluster-out and the smallest
detectable effect), and `holm` corrects a family of such tests.
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


Z_975, Z_80 = 1.959963984540054, 0.8416212335729143
EXACT_CLUSTERS = 16
"""Up to this many clusters the sign-flip test enumerates every pattern; past it, it samples them."""


@dataclass(frozen=True)
class Clustered:
    """A paired comparison whose prompts come in clusters (sources): the mean difference over prompts, its
    source-bootstrap CI, the sign-flip p-value, leave-one-source-out and the smallest detectable effect."""

    n: int
    clusters: int
    mean: float
    ci: tuple[float, float]
    p: float
    loso_min: float
    loso_max: float
    loso_same_sign: bool
    """Whether the mean keeps its sign whichever source is left out."""
    mde: float
    """The smallest |mean| detectable with 80% power at alpha 0.05 (two-sided), from the clustered SE."""

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["ci"] = list(self.ci)
        return out


def clustered(diffs: Sequence[float], clusters: Sequence[str], resamples: int = RESAMPLES) -> Clustered:
    """The comparison of paired differences `diffs` (A - B per prompt) grouped by `clusters`.

    p: two-sided sign-flip test, flipping each cluster's differences together (exact up to
    `EXACT_CLUSTERS` clusters). CI: percentile bootstrap over clusters. MDE: (z_0.975 + z_0.8) x the
    cluster-robust standard error of the mean."""
    d = np.asarray(diffs, dtype=np.float64)
    names = sorted(set(clusters))
    if len(d) == 0 or len(names) < 2:
        raise ValueError("a clustered comparison needs prompts from at least two clusters")
    index = np.array([names.index(c) for c in clusters])
    sums = np.bincount(index, weights=d, minlength=len(names))
    counts = np.bincount(index, minlength=len(names))
    observed = d.mean()
    g = len(names)
    if g <= EXACT_CLUSTERS:
        signs = 1 - 2 * ((np.arange(2**g)[:, None] >> np.arange(g)) & 1)
    else:
        signs = np.random.default_rng(0).choice([-1, 1], size=(resamples, g))
    flipped = (signs * sums).sum(1) / len(d)
    p = float(np.mean(np.abs(flipped) >= abs(observed) - 1e-15))
    rng = np.random.default_rng(0)
    draws = rng.integers(0, g, size=(resamples, g))
    boot = sums[draws].sum(1) / counts[draws].sum(1)
    low, high = np.percentile(boot, [2.5, 97.5])
    residual = np.bincount(index, weights=d - observed, minlength=g)
    se = float(np.sqrt((residual**2).sum() * g / (g - 1)) / len(d))
    loso = [(sums.sum() - sums[i]) / (len(d) - counts[i]) for i in range(g)]
    return Clustered(
        n=len(d),
        clusters=g,
        mean=float(observed),
        ci=(float(low), float(high)),
        p=p,
        loso_min=float(min(loso)),
        loso_max=float(max(loso)),
        loso_same_sign=bool(all(np.sign(x) == np.sign(observed) for x in loso)),
        mde=(Z_975 + Z_80) * se,
    )


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (family-wise error), by name."""
    order = sorted(p_values, key=p_values.get)  # type: ignore[arg-type]
    adjusted: dict[str, float] = {}
    running = 0.0
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[name]))
        adjusted[name] = running
    return adjusted
