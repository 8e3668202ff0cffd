"""`LoRABank`: the LoRA weights of many requests at once, so one forward/backward of the frozen base
model trains them all (each sequence through its own request's adapter).

Every adapted projection y = W x becomes

    y_i = W x_i + (alpha / r) * B_{s(i)} A_{s(i)} x_i

for the i-th sequence of the batch, where s(i) is the slot of the request it belongs to. A and B of all
S slots live in one (S, P) float32 parameter (each layer's A: (r, in), B: (out, r), in PEFT's init:
A Kaiming-uniform from the request's seed, B zero), so a layer gathers its rows' weights with one
`index_select` and applies them with two batched matmuls: no loop over requests inside a layer, and
gradients land only in the slots the batch used. The per-row slots are set around a forward with `use`.

Exports are PEFT directories (the tensor names and `adapter_config.json` PEFT writes), which vLLM and
`PeftModel` load as they are.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class _Segment:
    """Where one projection's A and B sit in a slot's row of the bank."""

    name: str
    in_features: int
    out_features: int
    a_offset: int
    b_offset: int


class _AdaptedLinear(nn.Module):
    """A frozen linear layer plus the bank's LoRA term for each row of the batch."""

    def __init__(self, base: nn.Linear, bank: LoRABank, segment: _Segment) -> None:
        super().__init__()
        self.base = base
        self.segment = segment
        object.__setattr__(self, "_bank", bank)  # not a submodule: the bank owns the parameter once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        bank, rows = self._bank, self._bank.rows
        if rows is None:
            return out
        seg, r = self.segment, bank.rank
        weights = bank.weights
        a = weights[:, seg.a_offset : seg.a_offset + r * seg.in_features].index_select(0, rows)
        b = weights[:, seg.b_offset : seg.b_offset + seg.out_features * r].index_select(0, rows)
        a = a.view(-1, r, seg.in_features)
        b = b.view(-1, seg.out_features, r)
        h = bank.dropout(x.to(weights.dtype))
        delta = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))
        return out + (bank.scaling * delta).to(out.dtype)


class LoRABank(nn.Module):
    """S adapter slots over the target projections of `model` (which it modifies in place)."""

    def __init__(
        self, model: nn.Module, target_modules: list[str], slots: int, rank: int, alpha: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.rank, self.slots, self.scaling = rank, slots, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.rows: torch.Tensor | None = None
        targets = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
        ]
        if not targets:
            raise ValueError(f"no linear layer named any of {target_modules} in the model")
        self.segments: list[_Segment] = []
        offset = 0
        for name, module in targets:
            a_size, b_size = rank * module.in_features, module.out_features * rank
            segment = _Segment(name, module.in_features, module.out_features, offset, offset + a_size)
            self.segments.append(segment)
            offset += a_size + b_size
        device = next(model.parameters()).device
        self.weights = nn.Parameter(torch.zeros(slots, offset, dtype=torch.float32, device=device))
        for (name, module), segment in zip(targets, self.segments, strict=True):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _AdaptedLinear(module, self, segment))

    @property
    def parameters_per_slot(self) -> int:
        return self.weights.shape[1]

    @contextlib.contextmanager
    def use(self, rows: torch.Tensor | list[int] | None) -> Iterator[None]:
        """Within the block, batch row i goes through slot rows[i]; None means the base model alone."""
        if rows is not None and not isinstance(rows, torch.Tensor):
            rows = torch.tensor(rows, dtype=torch.long, device=self.weights.device)
        previous, self.rows = self.rows, rows
        try:
            yield
        finally:
            self.rows = previous

    @torch.no_grad()
    def reset(self, slot: int, seed: int) -> None:
        """A fresh adapter in `slot`, as PEFT initialises one (A Kaiming-uniform, B zero), from `seed` only."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        row = self.weights[slot]
        row.zero_()
        for seg in self.segments:
            a = torch.empty(self.rank, seg.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            row[seg.a_offset : seg.a_offset + a.numel()].copy_(a.view(-1))

    def tensors(self, slot: int) -> dict[str, torch.Tensor]:
        """Slot `slot` under the names PEFT saves (base_model.model.<module>.lora_A.weight, ...)."""
        row, r, out = self.weights[slot].detach(), self.rank, {}
        for seg in self.segments:
            prefix = f"base_model.model.{seg.name}"
            a = row[seg.a_offset : seg.a_offset + r * seg.in_features].view(r, seg.in_features)
            b = row[seg.b_offset : seg.b_offset + seg.out_features * r].view(seg.out_features, r)
            out[f"{prefix}.lora_A.weight"] = a.clone()
            out[f"{prefix}.lora_B.weight"] = b.clone()
        return out

    @torch.no_grad()
    def load(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        """Put a saved adapter (PEFT names, as `tensors` gives them) into `slot`."""
        row, r = self.weights[slot], self.rank
        for seg in self.segments:
            prefix = f"base_model.model.{seg.name}"
            row[seg.a_offset : seg.a_offset + r * seg.in_features].copy_(tensors[f"{prefix}.lora_A.weight"].view(-1))
            row[seg.b_offset : seg.b_offset + seg.out_features * r].copy_(tensors[f"{prefix}.lora_B.weight"].view(-1))
