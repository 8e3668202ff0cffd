"""`select` and `select_batch`: choose the documents whose training teaches the model most about a prompt.

One greedy loop serves every rule (SIFT and the baselines) and every batch size: prompts are padded to
a common number of candidates and targets and masked, so a batch of B prompts costs one set of tensor
operations per step, not B Python loops. The posterior variance of the target is tracked for every
rule, so baselines report the same sigma^2 trace SIFT does.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from selection.kernel import ConditionedKernel
from selection.rules import Method, make_rule
from selection.stopping import MIN_LAMBDA, StopReason, gain_stops_before, stops_before


@dataclass(frozen=True)
class Selection:
    """The picks for one prompt, in pick order, and the target's posterior variance along the way."""

    indices: torch.Tensor
    """LongTensor of picks into the candidates, in pick order (repeats allowed for greedy rules)."""
    sigma2: torch.Tensor
    """len(indices) + 1 values: the prior variance, then after each pick (summed over targets)."""
    stop_reason: StopReason
    method: Method

    @property
    def repeats(self) -> int:
        """How many picks repeat an earlier pick (each repeat is one more training step on that document)."""
        return len(self.indices) - len(set(self.indices.tolist()))


def _prepare(
    tensors: torch.Tensor | Sequence[torch.Tensor], name: str, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """A padded (B, rows, d) tensor in `dtype` (default: its own), its bool mask of real rows, and the
    dtype the embeddings came in; clear errors for anything malformed.

    A (B, rows, d) tensor is used as is (no copy when the dtype matches); a ragged list is padded.
    Finiteness is checked with one sum per prompt: a NaN or infinity anywhere makes the sum non-finite.
    """
    if isinstance(tensors, torch.Tensor):
        if tensors.dim() == 2:
            tensors = tensors.unsqueeze(1)
        if tensors.dim() != 3 or 0 in tensors.shape:
            raise ValueError(f"{name} must have shape (B, d) or (B, rows, d), non-empty, got {tuple(tensors.shape)}")
        items: Sequence[torch.Tensor] = tensors
    else:
        items = [t.unsqueeze(0) if isinstance(t, torch.Tensor) and t.dim() == 1 else t for t in tensors]
        if not items:
            raise ValueError(f"{name}: empty batch")
        for b, t in enumerate(items):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"{name}[{b}] must be a 1-d or 2-d tensor")
            if t.shape[0] == 0:
                raise ValueError(f"{name}[{b}] is empty: nothing to select from or for")
            if t.shape[1] != items[0].shape[1]:
                raise ValueError(f"{name}[{b}] has dimension {t.shape[1]}, {name}[0] has {items[0].shape[1]}")
    source_dtype = items[0].dtype
    if not items[0].is_floating_point() or any(t.dtype != source_dtype for t in items):
        raise ValueError(f"{name} must be floating point, all of one dtype")
    dtype = dtype or source_dtype
    if isinstance(tensors, torch.Tensor):
        padded = tensors.to(dtype)
        mask = torch.ones(padded.shape[:2], dtype=torch.bool, device=padded.device)
    else:
        device = items[0].device
        rows = max(t.shape[0] for t in items)
        padded = torch.zeros(len(items), rows, items[0].shape[1], dtype=dtype, device=device)
        mask = torch.zeros(len(items), rows, dtype=torch.bool, device=device)
        for b, t in enumerate(items):
            padded[b, : t.shape[0]] = t.to(device=device, dtype=dtype)
            mask[b, : t.shape[0]] = True
    finite = torch.isfinite(padded.sum(dim=(1, 2)))
    if not bool(finite.all()):
        b = int((~finite).nonzero()[0])
        raise ValueError(f"{name}[{b}] contains NaN or infinite values")
    return padded, mask, source_dtype


def _check_scalars(n: int, lambda_: float, alpha: float | None, min_step_gain: float | None) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not (isinstance(lambda_, (int, float)) and math.isfinite(lambda_) and lambda_ >= MIN_LAMBDA):
        raise ValueError(f"lambda_ must be a finite number >= {MIN_LAMBDA} (float32 precision), got {lambda_!r}")
    if alpha is not None and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number or None, got {alpha!r}")
    if min_step_gain is not None and not (
        isinstance(min_step_gain, (int, float)) and math.isfinite(min_step_gain) and min_step_gain >= 0
    ):
        raise ValueError(f"min_step_gain must be a non-negative finite number or None, got {min_step_gain!r}")


def select_batch(
    targets: torch.Tensor | Sequence[torch.Tensor],
    candidates: torch.Tensor | Sequence[torch.Tensor],
    n: int,
    method: Method | str = Method.SIFT,
    lambda_: float = 0.01,
    alpha: float | None = None,
    *,
    min_step_gain: float | None = None,
    keys: Sequence[Sequence[Hashable]] | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    given: Sequence[int] | None = None,
) -> list[Selection]:
    """Select up to `n` candidates for each of B prompts at once.

    targets: (B, d), (B, m, d), or a list of (d,) / (m_b, d) tensors; candidates: (B, K, d) or a list of
    (K_b, d) tensors. Embeddings are used as given (no normalisation). With `min_step_gain`, a prompt
    stops before the first pick that removes less than that share of its prior variance; with `alpha`,
    before pick n as soon as sigma_n > 1 / (alpha * n) (`selection.stopping`); the pick that fails a
    rule is not returned. `keys` (per prompt, per candidate) define duplicates for `nn_f`;
    `seed` drives `random`. The arithmetic runs on the candidates' device in `dtype` (default: the
    embeddings' own dtype; float64 inputs get float64 throughout).

    `given[b]`: prompt b's first `given[b]` candidates are already selected (documents an adapter was
    trained on in an earlier turn): the kernel is conditioned on them before the first pick, so the picks are
    what is still informative given them, and `sigma2[0]` is the variance after them. They stay candidates:
    a pick below `given[b]` repeats one of them.
    """
    method = Method.parse(method)
    _check_scalars(n, lambda_, alpha, min_step_gain)
    t_pad, t_mask, t_dtype = _prepare(targets, "target", dtype)
    c_pad, c_mask, c_dtype = _prepare(candidates, "candidates", dtype)
    if t_pad.shape[0] != c_pad.shape[0]:
        raise ValueError(f"{t_pad.shape[0]} targets but {c_pad.shape[0]} candidate sets")
    if t_pad.shape[2] != c_pad.shape[2]:
        raise ValueError(f"target dimension {t_pad.shape[2]} != candidate dimension {c_pad.shape[2]}")
    if t_pad.dtype != c_pad.dtype or t_pad.device != c_pad.device:
        t_pad, t_mask = t_pad.to(c_pad), t_mask.to(c_pad.device)
    embedding_dtype = torch.promote_types(t_dtype, c_dtype)
    device = c_pad.device
    batch = c_pad.shape[0]
    counts_given = torch.tensor(list(given) if given is not None else [0] * batch, device=c_pad.device)
    if len(counts_given) != batch or bool((counts_given < 0).any()) or bool((counts_given > c_mask.sum(1)).any()):
        raise ValueError("given must hold, per prompt, a count between 0 and its number of candidates")
    prior_picks = int(counts_given.max()) if batch else 0
    kernel = ConditionedKernel(
        t_pad, t_mask, c_pad, c_mask, lambda_=lambda_, max_picks=n + prior_picks, embedding_dtype=embedding_dtype
    )
    rule = make_rule(method, kernel, keys, seed)  # fixed-order rules rank by the unconditioned kernel
    for t in range(prior_picks):  # the documents already trained on enter the selected set first
        kernel.condition(torch.full((batch,), t, device=c_pad.device), counts_given > t)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    stopped_by = {StopReason.MIN_GAIN: torch.zeros_like(active), StopReason.ALPHA: torch.zeros_like(active)}
    prior = kernel.variance().clone()
    picks_per_step, active_per_step, ktt_per_step = [], [], [kernel.ktt]
    for step in range(n):
        picks, available = rule.pick(kernel, step)
        if available is not None:
            active = active & available
        if alpha is not None or min_step_gain is not None:
            before = kernel.variance()
            after = before - kernel.variance_reduction_at(picks)
            if min_step_gain is not None:
                fails = active & gain_stops_before(prior, before, after, min_step_gain)
                stopped_by[StopReason.MIN_GAIN] |= fails
                active = active & ~fails
            if alpha is not None:
                fails = active & stops_before(after.clamp_min(0).sqrt(), step + 1, alpha)
                stopped_by[StopReason.ALPHA] |= fails
                active = active & ~fails
        if available is not None or alpha is not None or min_step_gain is not None:
            if not bool(active.any()):
                break
            kernel.condition(picks, active)
        else:
            kernel.condition(picks)
        picks_per_step.append(picks)
        active_per_step.append(active)
        ktt_per_step.append(kernel.ktt)

    steps = len(picks_per_step)
    all_picks = torch.stack(picks_per_step, 1).cpu() if steps else torch.empty(batch, 0, dtype=torch.long)
    counts = (torch.stack(active_per_step, 1).sum(1) if steps else torch.zeros(batch, dtype=torch.long)).cpu()
    all_variances = torch.stack(ktt_per_step, 1).sum(-1).cpu()  # (B, steps + 1)
    stopped_by = {reason: mask.cpu() for reason, mask in stopped_by.items()}
    results = []
    for b in range(batch):
        count = int(counts[b])
        early = [reason for reason, mask in stopped_by.items() if mask[b]]
        if early:
            reason = early[0]
        elif count < n:
            reason = StopReason.EXHAUSTED
        else:
            reason = StopReason.MAX_STEPS
        results.append(
            Selection(
                indices=all_picks[b, :count].clone(),
                sigma2=all_variances[b, : count + 1].clone(),
                stop_reason=reason,
                method=method,
            )
        )
    return results


def select(
    target: torch.Tensor,
    candidates: torch.Tensor,
    n: int,
    method: Method | str = Method.SIFT,
    lambda_: float = 0.01,
    alpha: float | None = None,
    *,
    min_step_gain: float | None = None,
    keys: Sequence[Hashable] | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> Selection:
    """Select up to `n` of the (K, d) `candidates` for a (d,) or (m, d) `target`; see `select_batch`."""
    if not isinstance(target, torch.Tensor) or target.dim() not in (1, 2):
        raise ValueError("target must be a tensor of shape (d,) or (m, d)")
    if not isinstance(candidates, torch.Tensor) or candidates.dim() != 2:
        raise ValueError("candidates must be a tensor of shape (K, d)")
    return select_batch(
        [target],
        [candidates],
        n,
        method=method,
        lambda_=lambda_,
        alpha=alpha,
        min_step_gain=min_step_gain,
        keys=[keys] if keys is not None else None,
        seed=seed,
        dtype=dtype,
    )[0]
