"""`LoRABank`: the LoRA weights of many requests at once, so one forward/backward of the frozen base
model trains them all (each sequence through its own request's adapter).

Every adapted projection y = W x becomes

    y_i = W x_i + (alpha / r) * B_{s(i)} A_{s(i)} x_i

for the i-th sequence of the batch, where s(i) is the slot of the request it belongs to. With `layers`,
only the projections of those decoder layers are adapted: below the lowest adapted layer nothing needs a
gradient, so the backward pass stops there (the upper half of the layers costs about half a backward). Each projection
holds the A (S, r, in) and B (S, out, r) of all S slots as two float32 parameters (PEFT's init: A
Kaiming-uniform from the request's seed, B zero), gathers its rows' weights with one `index_select` each
and applies them with two batched matmuls: no loop over requests inside a layer. Each projection's
gradient has the shape of its whole A and B (all slots), non-zero only in the slots the batch used; the
optimizer (`SlotAdamW`) steps only those slots. The per-row slots are set around a forward with `use`.
LoRA dropout follows the model's mode: active after `model.train()`, off after `model.eval()` (scoring and
generation are deterministic).

Exports are PEFT directories (the tensor names and `adapter_config.json` PEFT writes), which vLLM and
`PeftModel` load as they are.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator

import torch
from torch import nn


def layer_index(module_name: str) -> int | None:
    """The decoder layer a module belongs to (`model.layers.12.self_attn.q_proj` -> 12), None outside one."""
    found = re.search(r"\.layers\.(\d+)\.", f".{module_name}")
    return int(found[1]) if found else None


class _AdaptedLinear(nn.Module):
    """A frozen linear layer plus the bank's LoRA term for each row of the batch."""

    def __init__(self, base: nn.Linear, bank: LoRABank, name: str, slots: int, rank: int) -> None:
        super().__init__()
        self.base, self.name = base, name
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.zeros(slots, rank, base.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(slots, base.out_features, rank, device=device))
        object.__setattr__(self, "_bank", bank)  # a back-reference, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        bank = self._bank
        if bank.rows is None:
            return out
        a = self.lora_a.index_select(0, bank.rows)  # (B, r, in)
        b = self.lora_b.index_select(0, bank.rows)  # (B, out, r)
        h = nn.functional.dropout(x.to(a.dtype), bank.dropout, self.training)  # model.eval() turns it off
        delta = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))
        return out + (bank.scaling * delta).to(out.dtype)


class LoRABank(nn.Module):
    """S adapter slots over the target projections of `model` (which it modifies in place)."""

    def __init__(
        self,
        model: nn.Module,
        target_modules: list[str],
        slots: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        layers: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.rank, self.scaling = rank, alpha / rank
        self.dropout = dropout
        self.rows: torch.Tensor | None = None
        targets = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and name.rsplit(".", 1)[-1] in target_modules
            and (layers is None or layer_index(name) in layers)
        ]
        if not targets:
            raise ValueError(f"no linear layer named any of {target_modules} in the model")
        self.layers = nn.ModuleList()
        for name, module in targets:
            layer = _AdaptedLinear(module, self, name, slots, rank)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
            self.layers.append(layer)
        self.device = next(model.parameters()).device

    def lora_parameters(self) -> list[nn.Parameter]:
        """Every A and B, each with the slot as its first dimension."""
        return [p for layer in self.layers for p in (layer.lora_a, layer.lora_b)]

    @property
    def parameters_per_slot(self) -> int:
        return sum(p[0].numel() for p in self.lora_parameters())

    @contextlib.contextmanager
    def use(self, rows: torch.Tensor | list[int] | None) -> Iterator[None]:
        """Within the block, batch row i goes through slot rows[i]; None means the base model alone."""
        if rows is not None and not isinstance(rows, torch.Tensor):
            rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        previous, self.rows = self.rows, rows
        try:
            yield
        finally:
            self.rows = previous

    @torch.no_grad()
    def reset(self, slot: int, seed: int) -> None:
        """A fresh adapter in `slot`, as PEFT initialises one (A Kaiming-uniform, B zero), from `seed` only."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        for layer in self.layers:
            a = torch.empty(layer.lora_a.shape[1:])
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            layer.lora_a[slot].copy_(a)
            layer.lora_b[slot].zero_()

    @torch.no_grad()
    def load(self, slot: int, tensors: dict[str, torch.Tensor], scaling: float) -> None:
        """Start `slot` from an adapter (PEFT names, rank at most r, its own scaling): its delta exactly, in
        the slot's first ranks; the other ranks keep their fresh initialisation (A random, B zero), so they
        can still learn. Call after `reset`."""
        names = {f"base_model.model.{layer.name}": layer for layer in self.layers}
        modules = {name.rsplit(".lora_", 1)[0] for name in tensors}
        if unknown := modules - names.keys():
            raise ValueError(f"the adapter has projections this trainer does not adapt: {sorted(unknown)[:3]}")
        for module in modules:
            layer = names[module]
            a, b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
            rank = a.shape[0]
            if rank > self.rank or a.shape[1:] != layer.lora_a.shape[2:] or b.shape != (layer.lora_b.shape[1], rank):
                raise ValueError(f"{module}: adapter of shape A {tuple(a.shape)}, B {tuple(b.shape)} does not fit")
            layer.lora_a[slot, :rank].copy_(a)
            layer.lora_b[slot, :, :rank].copy_(b * (scaling / self.scaling))

    def tensors(self, slot: int) -> dict[str, torch.Tensor]:
        """Slot `slot` under the names PEFT saves (base_model.model.<module>.lora_A.weight, ...)."""
        out = {}
        for layer in self.layers:
            out[f"base_model.model.{layer.name}.lora_A.weight"] = layer.lora_a[slot].detach().clone()
            out[f"base_model.model.{layer.name}.lora_B.weight"] = layer.lora_b[slot].detach().clone()
        return out

    @torch.no_grad()
    def finite(self, slot: int) -> bool:
        """Whether every weight of `slot` is finite (a diverged adapter is never exported)."""
        return all(bool(torch.isfinite(p[slot]).all()) for p in self.lora_parameters())
