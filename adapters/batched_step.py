"""`BatchedStep`: one optimizer step for many adapters in one forward and backward of the frozen base model.

Each row of the batch is one request's next document and goes through its own slot's LoRA weights
(`LoRABank`). Row i's loss is the mean next-token cross-entropy over its own tokens,

    L_i = (1 / T_i) sum_t -log p(x_{i,t+1} | x_{i,<=t}),

and the batch minimises sum_i L_i: slot s(i)'s gradient is dL_i/dW_s(i) alone, so a request's update does
not depend on its batch-mates (padding is masked out of both the attention and the loss). A row whose loss
is not finite contributes no gradient and its slot takes no optimizer step. Each slot has its own AdamW
state (`SlotAdamW`), learning rate and seeded initialisation. The base weights are frozen and never
written; an adapter leaves as a PEFT adapter in bytes (`AdapterBlob`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.config import TrainerConfig
from adapters.handle import AdapterBlob
from adapters.lora_bank import LoRABank
from adapters.slot_adamw import SlotAdamW
from adapters.state import SlotState


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that supports it, else float32."""
    if name == "auto":
        cuda = device.startswith("cuda") and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


class OptimizerStepError(RuntimeError):
    """The optimizer step failed after a forward and backward that succeeded: the whole batch fails (the
    cause is the step's own error). Retrying part of the batch could step some slots twice."""


class BatchedStep:
    """The base model with `config.max_batch` adapter slots, and the step that trains them together.

    `config.device` must be resolved (no `auto`)."""

    def __init__(self, model_dir: Path, config: TrainerConfig) -> None:
        self.config, self.model_dir = config, Path(model_dir)
        self.device = config.device
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        dtype = resolve_dtype(config.dtype, config.device)
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype)
        self.model = model.to(config.device)  # type: ignore[arg-type]  # transformers types `to` too narrowly
        self.model.requires_grad_(False)
        self.model.eval()
        targets = list(config.target_modules)
        layers = config.layers.layers(self.model.config.num_hidden_layers)
        self.bank = LoRABank(
            self.model, targets, config.max_batch, config.rank, config.lora_alpha, config.lora_dropout, layers
        )
        self.optimizer = SlotAdamW(self.bank.lora_parameters(), eps=1e-8)
        lora = LoraConfig(
            r=config.rank,
            lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft keeps a float as given
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            layers_to_transform=layers,
            layers_pattern="layers" if layers is not None else None,
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=str(self.model_dir),
        )
        self._adapter_config_json = json.dumps(lora.to_dict(), indent=2, sort_keys=True, default=list)
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def reset(self, slot: int, seed: int, learning_rate: float, initial: AdapterBlob | None = None) -> None:
        """A fresh adapter in `slot` (PEFT's initialisation from `seed`, or starting from `initial`'s delta)
        with fresh optimizer state."""
        self.bank.reset(slot, seed)
        if initial is not None:
            self.bank.load(slot, initial.tensors(), initial.scaling)
        self.optimizer.reset(slot, learning_rate, self.config.weight_decay)

    def snapshot(self, slot: int) -> SlotState:
        """`slot`'s adapter and optimizer as they stand (copies), to resume later with `restore`."""
        first, second, steps = self.optimizer.moments(slot)
        return SlotState(self.bank.tensors(slot), first, second, steps)

    def restore(self, slot: int, state: SlotState, learning_rate: float) -> None:
        """`slot` continues the training saved in `state` (its weights and AdamW state), at `learning_rate`."""
        self.bank.reset(slot, 0)
        self.bank.load(slot, state.weights, self.bank.scaling)
        self.optimizer.restore(
            slot, (state.exp_avg, state.exp_avg_sq, state.steps), learning_rate, self.config.weight_decay
        )

    def blob(self, weights: dict[str, torch.Tensor]) -> AdapterBlob:
        """Weights in this trainer's shape (a saved state's) as a PEFT adapter in bytes."""
        return AdapterBlob.of(weights, self._adapter_config_json)

    def tokens(self, text: str, max_tokens: int) -> torch.Tensor:
        """`text` as token ids, truncated to `max_tokens`."""
        ids = self.tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt").input_ids[0]
        return ids.to(self.device)

    def run(self, rows: Sequence[tuple[int, torch.Tensor]]) -> list[float]:
        """One step for each (slot, ids) row: every row's loss, and an optimizer step for the slots whose
        loss is finite. Raises (with no gradient left behind) if the forward or backward fails, and
        `OptimizerStepError` if the optimizer step does."""
        losses = self._forward_backward(rows)
        try:
            finite = [slot for (slot, _), loss in zip(rows, losses, strict=True) if math.isfinite(loss)]
            if finite:
                self.optimizer.step(finite)
        except Exception as exc:
            raise OptimizerStepError(str(exc)) from exc
        finally:
            self._clear_gradients()
        return losses

    def export(self, slot: int) -> AdapterBlob:
        """Slot `slot` as a PEFT adapter in bytes (what PeftModel.save_pretrained would write)."""
        return self.blob(self.bank.tensors(slot))

    def finite(self, slot: int) -> bool:
        """Whether every weight of `slot` is finite."""
        return self.bank.finite(slot)

    @contextlib.contextmanager
    def use(self, slot: int | None) -> Iterator[torch.nn.Module]:
        """The model with `slot`'s adapter as it stands (None: the base model alone), for one sequence at a
        time and no gradients: for scoring between steps."""
        with torch.no_grad(), self.bank.use(None if slot is None else [slot]):
            yield self.model

    def _forward_backward(self, rows: Sequence[tuple[int, torch.Tensor]]) -> list[float]:
        width = max(ids.numel() for _, ids in rows)
        input_ids = torch.full((len(rows), width), self._pad, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(input_ids)
        for row, (_, ids) in enumerate(rows):
            input_ids[row, : ids.numel()] = ids
            mask[row, : ids.numel()] = 1
        self.model.train()
        try:
            with self.bank.use([slot for slot, _ in rows]):
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits
            # Targets are the inputs shifted left, -100 (ignored) past each sequence's end: no copy of the logits.
            targets = torch.nn.functional.pad(input_ids.masked_fill(mask == 0, -100)[:, 1:], (0, 1), value=-100)
            token_loss = torch.nn.functional.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            ).view(targets.shape)
            per_sequence = token_loss.sum(1) / (targets != -100).sum(1)
            finite = torch.isfinite(per_sequence)
            if finite.any():
                per_sequence[finite].sum().backward()
        except BaseException:
            self._clear_gradients()
            raise
        finally:
            self.model.eval()
        return per_sequence.detach().tolist()

    def _clear_gradients(self) -> None:
        for param in self.bank.lora_parameters():
            param.grad = None
