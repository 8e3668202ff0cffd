"""`SlotState`: one adapter's whole training state, what a conversation carries from one turn to the next.

The weights (PEFT names, the slot's A and B) and its AdamW state (first and second moments, in the order of
`LoRABank.lora_parameters`, and the step count), so that training resumes exactly where it stopped: the
next step's update is the one an uninterrupted run would have taken (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlotState:
    weights: dict[str, torch.Tensor]
    exp_avg: tuple[torch.Tensor, ...]
    exp_avg_sq: tuple[torch.Tensor, ...]
    steps: int

    @property
    def nbytes(self) -> int:
        """Bytes held (what a session store budgets)."""
        tensors = [*self.weights.values(), *self.exp_avg, *self.exp_avg_sq]
        return sum(t.numel() * t.element_size() for t in tensors)
