"""AdamW with one independent state per adapter slot, over parameters whose first dimension is the slot.

For the rows of the slots stepped (each with its own step count t_s, learning rate lr_s and weight
decay wd_s), exactly torch.optim.AdamW's update:

    p   <- p * (1 - lr_s * wd_s)
    m   <- beta1 m + (1 - beta1) g            v <- beta2 v + (1 - beta2) g^2
    p   <- p - lr_s / (1 - beta1^t_s) * m / (sqrt(v) / sqrt(1 - beta2^t_s) + eps)

Slots not stepped keep their parameters and moments untouched, so a request's optimizer never sees
another request's gradients, and a slot reset starts a new optimizer.
"""

from __future__ import annotations

import torch


class SlotAdamW:
    """Per-slot AdamW for parameters shaped (S, ...), S slots each."""

    def __init__(
        self, params: list[torch.nn.Parameter], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.params, self.betas, self.eps = params, betas, eps
        slots = params[0].shape[0]
        self.exp_avg = [torch.zeros_like(p, requires_grad=False) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p, requires_grad=False) for p in params]
        self.steps = [0] * slots
        self.lr = [0.0] * slots
        self.weight_decay = [0.0] * slots

    def reset(self, slot: int, lr: float, weight_decay: float) -> None:
        """A new optimizer for `slot`: zero moments, step count 0."""
        for m, v in zip(self.exp_avg, self.exp_avg_sq, strict=True):
            m[slot].zero_()
            v[slot].zero_()
        self.steps[slot], self.lr[slot], self.weight_decay[slot] = 0, lr, weight_decay

    def moments(self, slot: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], int]:
        """`slot`'s first and second moments (copies, one per parameter) and its step count."""
        first = tuple(m[slot].detach().clone() for m in self.exp_avg)
        second = tuple(v[slot].detach().clone() for v in self.exp_avg_sq)
        return first, second, self.steps[slot]

    @torch.no_grad()
    def restore(
        self,
        slot: int,
        moments: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], int],
        lr: float,
        weight_decay: float,
    ) -> None:
        """`slot` continues an optimizer saved by `moments`, at `lr`."""
        first, second, steps = moments
        for m, v, saved_m, saved_v in zip(self.exp_avg, self.exp_avg_sq, first, second, strict=True):
            m[slot].copy_(saved_m)
            v[slot].copy_(saved_v)
        self.steps[slot], self.lr[slot], self.weight_decay[slot] = steps, lr, weight_decay

    @torch.no_grad()
    def step(self, slots: list[int]) -> None:
        """One AdamW step for each slot in `slots`, from the parameters' gradient rows."""
        beta1, beta2 = self.betas
        device = self.params[0].device
        index = torch.tensor(slots, dtype=torch.long, device=device)
        for s in slots:
            self.steps[s] += 1

        def per_slot(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=self.params[0].dtype, device=device)

        factors = (
            per_slot([1 - self.lr[s] * self.weight_decay[s] for s in slots]),  # decay
            per_slot([self.lr[s] / (1 - beta1 ** self.steps[s]) for s in slots]),  # step size
            per_slot([(1 - beta2 ** self.steps[s]) ** 0.5 for s in slots]),  # sqrt of bias correction 2
        )
        for param, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            shape = (-1, *([1] * (param.dim() - 1)))
            decay, step_size, bc2_sqrt = (f.view(shape) for f in factors)
            grad = param.grad.index_select(0, index)
            p = param.data.index_select(0, index).mul_(decay)
            m = exp_avg.index_select(0, index).lerp_(grad, 1 - beta1)
            v = exp_avg_sq.index_select(0, index).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            p.sub_(step_size * m / (v.sqrt() / bc2_sqrt).add_(self.eps))
            param.data.index_copy_(0, index, p)
            exp_avg.index_copy_(0, index, m)
            exp_avg_sq.index_copy_(0, index, v)
