"""AdamW with one independent state per adapter slot, over the bank's (S, P) parameter.

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
    """Per-slot AdamW for a parameter whose first dimension is the slot."""

    def __init__(self, param: torch.nn.Parameter, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.param, self.betas, self.eps = param, betas, eps
        slots = param.shape[0]
        self.exp_avg = torch.zeros_like(param, requires_grad=False)
        self.exp_avg_sq = torch.zeros_like(param, requires_grad=False)
        self.steps = [0] * slots
        self.lr = [0.0] * slots
        self.weight_decay = [0.0] * slots

    def reset(self, slot: int, lr: float, weight_decay: float) -> None:
        """A new optimizer for `slot`: zero moments, step count 0."""
        self.exp_avg[slot].zero_()
        self.exp_avg_sq[slot].zero_()
        self.steps[slot], self.lr[slot], self.weight_decay[slot] = 0, lr, weight_decay

    @torch.no_grad()
    def step(self, slots: list[int]) -> None:
        """One AdamW step for each slot in `slots` from the parameter's gradient rows."""
        beta1, beta2 = self.betas
        index = torch.tensor(slots, dtype=torch.long, device=self.param.device)
        for s in slots:
            self.steps[s] += 1

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=self.param.dtype, device=self.param.device)[:, None]

        decay = column([1 - self.lr[s] * self.weight_decay[s] for s in slots])
        step_size = column([self.lr[s] / (1 - beta1 ** self.steps[s]) for s in slots])
        bc2_sqrt = column([(1 - beta2 ** self.steps[s]) ** 0.5 for s in slots])
        grad = self.param.grad.index_select(0, index)
        p = self.param.data.index_select(0, index).mul_(decay)
        m = self.exp_avg.index_select(0, index).lerp_(grad, 1 - beta1)
        v = self.exp_avg_sq.index_select(0, index).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        p.sub_(step_size * m / (v.sqrt() / bc2_sqrt).add_(self.eps))
        self.param.data.index_copy_(0, index, p)
        self.exp_avg.index_copy_(0, index, m)
        self.exp_avg_sq.index_copy_(0, index, v)
