"""SIFT and the baselines against first principles, brute force, and the paper's own library."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selection import Method, select, select_batch
from selection.selector import SelectOptions
from selection.stopping import step_threshold


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def random_problem(k: int, d: int, m: int = 1, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    candidates = unit(torch.randn(k, d, generator=g, dtype=dtype))
    target = unit(torch.randn(m, d, generator=g, dtype=dtype))
    return target, candidates


def kernel_variance(target: torch.Tensor, chosen: torch.Tensor, lam: float) -> float:
    """sum_j k(t_j,t_j) - k_X(t_j)^T (K_X + lam I)^-1 k_X(t_j), from scratch."""
    if len(chosen) == 0:
        return float((target * target).sum())
    kxx = chosen @ chosen.T + lam * torch.eye(len(chosen), dtype=chosen.dtype)
    ktx = target @ chosen.T
    return float((target * target).sum() - (ktx * torch.linalg.solve(kxx, ktx.T).T).sum())


def primal_variance(target: torch.Tensor, chosen: torch.Tensor, lam: float) -> float:
    """lam * t^T (Phi^T Phi + lam I)^-1 t summed over targets: the weight-space form."""
    d = target.shape[1]
    a = chosen.T @ chosen + lam * torch.eye(d, dtype=target.dtype)
    return float(lam * (target * torch.linalg.solve(a, target.T).T).sum())


@pytest.mark.parametrize("m", [1, 3])
def test_sigma2_matches_kernel_and_primal_forms(m):
    target, candidates = random_problem(40, 12, m=m, seed=m)
    sel = select(target, candidates, 15, lambda_=0.05)
    assert len(sel.indices) == 15 and len(sel.sigma2) == 16
    for n in range(16):
        chosen = candidates[sel.indices[:n]]
        kv = kernel_variance(target, chosen, 0.05)
        pv = primal_variance(target, chosen, 0.05)
        assert kv == pytest.approx(pv, rel=1e-8, abs=1e-10)
        assert float(sel.sigma2[n]) == pytest.approx(kv, rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("seed,k,n,lam,m", [(0, 30, 10, 0.01, 1), (1, 25, 20, 0.1, 1), (2, 20, 12, 1.0, 2)])
def test_greedy_equals_brute_force(seed, k, n, lam, m):
    target, candidates = random_problem(k, 8, m=m, seed=seed)
    sel = select(target, candidates, n, lambda_=lam)
    chosen: list[int] = []
    for _ in range(n):
        after = [kernel_variance(target, candidates[chosen + [x]], lam) for x in range(k)]
        chosen.append(int(np.argmin(after)))
    assert sel.indices.tolist() == chosen


def activeft_vtl(target: torch.Tensor, candidates: torch.Tensor, n: int, lam: float) -> list[int]:
    """The paper's library: VTL with noise_std = sqrt(lambda'), as activeft's Retriever sets it up."""
    from activeft import ActiveDataLoader
    from activeft.acquisition_functions.vtl import VTL
    from activeft.sift import Dataset

    target, candidates = target.float(), candidates.float()  # activeft works in float32 only
    acquisition = VTL(
        target=target, num_workers=1, subsample=False, force_nonsequential=False, noise_std=math.sqrt(lam)
    )
    loader = ActiveDataLoader(
        dataset=Dataset(candidates),
        batch_size=n,
        acquisition_function=acquisition,
        device=torch.device("cpu"),
    )
    indices, _ = loader.next()
    return [int(i) for i in indices]


@pytest.mark.parametrize("k,n,lam", [(50, 10, 0.01), (200, 50, 0.01), (100, 30, 0.1), (60, 40, 1.0)])
def test_conforms_to_activeft_on_random_data(k, n, lam):
    target, candidates = random_problem(k, 32, seed=k + n, dtype=torch.float32)
    ours = select(target, candidates, n, lambda_=lam).indices.tolist()
    assert ours == activeft_vtl(target, candidates, n, lam)


def duplicate_heavy(seed: int = 0, copies: int = 10, distinct: int = 8, d: int = 32):
    """A near-duplicate family close to the target, plus distinct relevant and irrelevant documents."""
    g = torch.Generator().manual_seed(seed)
    target = unit(torch.randn(d, generator=g, dtype=torch.float64))
    near = unit(target + 0.4 * unit(torch.randn(d, generator=g, dtype=torch.float64)))
    family = near.repeat(copies, 1)
    others = unit(target + 1.2 * unit(torch.randn(distinct, d, generator=g, dtype=torch.float64)))
    noise = unit(torch.randn(20, d, generator=g, dtype=torch.float64))
    order = torch.randperm(copies + distinct + 20, generator=g)
    candidates = torch.cat([family, others, noise])[order]
    is_copy = order < copies
    return target, candidates, is_copy


def first_copy(candidates: torch.Tensor) -> list[int]:
    """For each candidate, the lowest index holding an identical vector."""
    return [int(torch.nonzero((candidates == row).all(-1))[0]) for row in candidates]


@pytest.mark.parametrize("n,lam", [(10, 0.01), (15, 0.1), (25, 0.01)])
def test_conforms_to_activeft_on_duplicate_heavy_data(n, lam):
    target, candidates, _ = duplicate_heavy(seed=n)
    target, candidates = target.float(), candidates.float()
    ours = select(target, candidates, n, lambda_=lam).indices.tolist()
    theirs = activeft_vtl(target.unsqueeze(0), candidates, n, lam)
    # Exact copies tie. We break ties by the lowest index (as the method defines); activeft's float32 Gram matrix gives
    # identical rows slightly different values, so it takes an arbitrary copy. Same documents, same order:
    canonical = first_copy(candidates)
    assert [canonical[i] for i in ours] == [canonical[i] for i in theirs]
    assert ours == [canonical[i] for i in ours], "ties must go to the lowest index"


def test_sift_avoids_copies_that_nn_keeps_picking():
    target, candidates, is_copy = duplicate_heavy(copies=10, distinct=8)
    nn = select(target, candidates, 10, method="nn")
    sift = select(target, candidates, 10, method="sift")
    assert is_copy[nn.indices].all(), "NN should spend its whole budget on copies of one document"
    assert int(is_copy[sift.indices].sum()) <= 2, "SIFT should take the family once, then new information"
    assert sift.sigma2[-1] < nn.sigma2[-1]
    nn_f = select(target, candidates, 10, method="nn_f")
    assert int(is_copy[nn_f.indices].sum()) == 1


def test_repeats_are_allowed_and_reported():
    target, candidates = random_problem(3, 4, seed=5)
    sel = select(target, candidates, 8, lambda_=0.5)
    assert len(sel.indices) == 8 and sel.repeats == 8 - len(set(sel.indices.tolist())) > 0
    assert sel.stop_reason == "max_steps"


def test_ties_break_to_lowest_index():
    target = unit(torch.ones(4, dtype=torch.float64))
    candidates = torch.stack([unit(torch.tensor([1.0, 1, 1, 0], dtype=torch.float64))] * 3)
    assert select(target, candidates, 1).indices.tolist() == [0]
    assert select(target, candidates, 1, method="uncertainty").indices.tolist() == [0]


def test_adaptive_stopping_truncates_at_first_violation():
    target, candidates = random_problem(100, 16, seed=3)
    full = select(target, candidates, 40)
    sigma = full.sigma2.clamp_min(0).sqrt()
    for alpha in (0.5, 1.0, 2.0, 5.0):
        violations = [n for n in range(1, 41) if sigma[n] > 1 / (alpha * n)]
        expected = (violations[0] - 1) if violations else 40
        sel = select(target, candidates, 40, alpha=alpha)
        assert len(sel.indices) == expected
        assert sel.indices.tolist() == full.indices[:expected].tolist()
        assert torch.allclose(sel.sigma2, full.sigma2[: expected + 1])
        assert sel.stop_reason == ("alpha" if violations else "max_steps")


def test_adaptive_stopping_can_stop_before_the_first_step():
    target, candidates = random_problem(10, 16, seed=4)
    sel = select(target, candidates, 5, alpha=100.0)  # sigma_1 > 1/100 for any informative-enough target
    assert len(sel.indices) == 0 and len(sel.sigma2) == 1 and sel.stop_reason == "alpha"


def test_gain_stopping_truncates_where_a_pick_stops_paying():
    target, candidates = random_problem(100, 16, seed=3)
    full = select(target, candidates, 40)
    gains = (full.sigma2[:-1] - full.sigma2[1:]) / full.sigma2[0]  # share of the prior each pick removes
    for threshold in (0.0, 1e-3, 1e-2, 0.05, 0.5):
        failing = [n for n in range(1, 41) if gains[n - 1] < threshold]
        expected = (failing[0] - 1) if failing else 40
        sel = select(target, candidates, 40, min_step_gain=threshold)
        assert sel.indices.tolist() == full.indices[:expected].tolist()
        assert torch.allclose(sel.sigma2, full.sigma2[: expected + 1])
        assert sel.stop_reason == ("min_gain" if failing else "max_steps")


def test_gain_stopping_is_batched_per_prompt():
    targets, candidates = zip(*(random_problem(30, 8, seed=s) for s in range(4)), strict=True)
    batched = select_batch(list(targets), list(candidates), 20, min_step_gain=0.02, alpha=1.5)
    for t, c, b in zip(targets, candidates, batched, strict=True):
        one = select(t, c, 20, min_step_gain=0.02, alpha=1.5)
        assert b.indices.tolist() == one.indices.tolist() and b.stop_reason == one.stop_reason


def test_step_threshold_prices_the_steps_tokens():
    assert step_threshold(0.1, 128) == pytest.approx(0.0128)
    assert step_threshold(0.1, 256) == 2 * step_threshold(0.1, 128)


@pytest.mark.parametrize("method", ["sift", "nn", "nn_f", "uncertainty", "random"])
@pytest.mark.parametrize("alpha", [None, 1.5])
def test_batched_equals_one_by_one(method, alpha):
    g = torch.Generator().manual_seed(7)
    targets = [unit(torch.randn(m, 16, generator=g, dtype=torch.float64)) for m in (1, 2, 1, 3)]
    candidates = [unit(torch.randn(k, 16, generator=g, dtype=torch.float64)) for k in (30, 12, 25, 40)]
    batched = select_batch(targets, candidates, 15, method=method, alpha=alpha, seed=3)
    for t, c, b in zip(targets, candidates, batched, strict=True):
        one = select(t, c, 15, method=method, alpha=alpha, seed=3)
        assert b.indices.tolist() == one.indices.tolist()
        assert torch.allclose(b.sigma2, one.sigma2)
        assert b.stop_reason == one.stop_reason


def test_baselines():
    target, candidates = random_problem(20, 8, seed=9)
    sims = (candidates @ target.T).squeeze(-1) ** 2
    nn = select(target, candidates, 5, method="nn")
    assert nn.indices.tolist() == torch.argsort(sims, descending=True)[:5].tolist()
    assert select(target, candidates, 30, method="nn").stop_reason == "exhausted"
    rnd = select(target, candidates, 20, method="random", seed=1)
    assert sorted(rnd.indices.tolist()) == list(range(20))
    assert rnd.indices.tolist() == select(target, candidates, 20, method="random", seed=1).indices.tolist()
    assert rnd.indices.tolist() != select(target, candidates, 20, method="random", seed=2).indices.tolist()
    scaled = candidates * torch.linspace(0.5, 1.5, 20, dtype=candidates.dtype).flip(0).roll(7).unsqueeze(-1)
    us = select(target, scaled, 3, method="uncertainty")
    assert us.indices[0] == torch.argmax(scaled.norm(dim=-1))  # largest prior variance k(x, x) first
    keys = ["a"] * 10 + [str(i) for i in range(10)]
    nn_f = select(target, candidates, 20, method="nn_f", keys=keys)
    assert len(nn_f.indices) == 11 and nn_f.stop_reason == "exhausted"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"n": 0}, "positive integer"),
        ({"n": -3}, "positive integer"),
        ({"method": "nope"}, "unknown selection method"),
        ({"lambda_": 0.0}, "lambda_"),
        ({"lambda_": float("nan")}, "lambda_"),
        ({"alpha": -1.0}, "alpha"),
        ({"min_step_gain": -0.1}, "min_step_gain"),
        ({"min_step_gain": float("inf")}, "min_step_gain"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    target, candidates = random_problem(5, 4)
    args = {"n": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        select(target, candidates, **args)


def test_one_vocabulary_names_the_rules():
    """The enum is what the config, the API and the Selector accept; its error lists every rule."""
    assert Method.parse("nn_f") is Method.NN_F and select(*random_problem(5, 4), 2, method="nn").method is Method.NN
    with pytest.raises(ValueError, match="choose one of sift, nn, nn_f, uncertainty, random"):
        Method.parse("SIFT")
    with pytest.raises(ValueError, match="unknown selection method 'bm25'"):
        SelectOptions(3, "bm25")
    with pytest.raises(ValueError, match="candidates must be positive"):
        SelectOptions(3, candidates=0)
    assert SelectOptions(3, "random") == SelectOptions(3, Method.RANDOM)  # equal options batch together


def test_bad_tensors_are_clear_errors():
    target, candidates = random_problem(5, 4)
    with pytest.raises(ValueError, match="dimension"):
        select(target, candidates[:, :3], 2)
    with pytest.raises(ValueError, match="empty"):
        select(target, candidates[:0], 2)
    bad = candidates.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select(target, bad, 2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        select(target * float("inf"), candidates, 2)
    with pytest.raises(ValueError, match="targets but"):
        select_batch([target[0]], [candidates, candidates], 2)


def test_lambda_has_a_float32_lower_bound():
    from selection.stopping import MIN_LAMBDA

    target, candidates = torch.randn(8), torch.randn(20, 8)
    with pytest.raises(ValueError, match="lambda_"):
        select(target, candidates, 3, lambda_=1e-8)  # float32 would divide by ~0 and pick index 0 forever
    torch.manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(200, 64), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(64), dim=-1)
    single = select(t, c, 30, lambda_=MIN_LAMBDA)
    double = select(t.double(), c.double(), 30, lambda_=MIN_LAMBDA)
    assert single.indices.tolist() == double.indices.tolist()
    assert torch.allclose(single.sigma2.double(), double.sigma2, atol=1e-5)


def test_many_exact_copies_at_the_smallest_lambda_stay_finite():
    from selection.stopping import MIN_LAMBDA

    torch.manual_seed(1)
    c = torch.nn.functional.normalize(torch.randn(20, 32), dim=-1)
    copies = torch.cat([c[:1].repeat(50, 1), c[1:]])  # rows 0..49 identical
    t = torch.nn.functional.normalize(c[0] + 0.1 * torch.randn(32), dim=-1)
    sel = select(t, copies, 30, lambda_=MIN_LAMBDA)
    assert torch.isfinite(sel.sigma2).all() and (sel.sigma2 >= 0).all()
    assert not set(sel.indices.tolist()) & set(range(1, 50))  # a copy ties with row 0, which wins


def test_argmax_never_picks_nan_or_padding():
    from selection.rules.sift import first_argmax

    nan = float("nan")
    assert first_argmax(torch.tensor([[nan, 0.5, 0.2], [0.1, nan, 0.3]]), 1e-6).tolist() == [1, 2]
    # A prompt with 2 real candidates padded to 4, next to one with 4: padding is never picked.
    small = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    big = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    targets = [torch.nn.functional.normalize(torch.randn(8), dim=-1) for _ in range(2)]
    picks = select_batch(targets, [small, big], 6)
    assert max(picks[0].indices.tolist()) <= 1
