"""`Trainer`: fits a fresh LoRA adapter per prompt on the documents SIFT picked, then hands it over.

A plain object (no Ray inside) that loads the base model once and serves many requests, one at a time
(one model copy; a request says how long it waited). Per request: new LoRA weights (re-initialised in
place, seeded), a new AdamW optimizer, one step per picked document in pick order (a repeated pick is
another step), batch 1, causal-LM loss on the document truncated to `max_train_tokens`. The base
weights are frozen and never written; the adapter is exported as a PEFT directory on tmpfs.

Which documents to train on (and so the adaptive stopping rule) is selection's decision; the trainer
stops early only for `max_steps`, the time budget or cancellation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.config import TrainerConfig
from adapters.handle import AdapterHandle, adapter_root, cleanup_stale, new_adapter_dir, remove_adapter_dir
from selection.stopping import StopReason

log = logging.getLogger(__name__)

_ADAPTER = "default"  # peft writes a non-default adapter into a sub-directory; one adapter lives at a time


class TrainerBusyError(RuntimeError):
    """Too many requests are already waiting for the trainer."""


@dataclass(frozen=True)
class TrainRequest:
    """What to train on for one prompt, and per-request overrides of the trainer's configuration."""

    documents: Sequence[str]
    """Document texts in pick order (repeats allowed: each occurrence is one step)."""
    documents_end: StopReason = StopReason.MAX_STEPS
    """Why the document list ends where it does (selection's stop reason): reported when all are trained on."""
    request_id: str = ""
    """The serving request this training is for (in log lines)."""
    max_steps: int | None = None
    learning_rate: float | None = None
    max_train_tokens: int | None = None
    time_budget_s: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.documents, str) or any(not isinstance(d, str) for d in self.documents):
            raise ValueError("documents must be a sequence of strings")
        for name in ("learning_rate", "time_budget_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.max_train_tokens is not None and self.max_train_tokens < 2:
            raise ValueError(f"max_train_tokens must be >= 2, got {self.max_train_tokens}")


@dataclass(frozen=True)
class TrainStep:
    """Progress: optimizer step `step` (1-based) is done, with this training loss."""

    step: int
    loss: float


@dataclass
class TrainResult:
    """The adapter (None when no step was taken or the request was cancelled) and what it cost."""

    adapter: AdapterHandle | None
    steps: int
    stop_reason: StopReason
    """The request's `documents_end` when every document was trained on, else max_steps, time_budget
    or cancelled."""
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0
    export_seconds: float = 0.0
    queue_seconds: float = 0.0


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        cuda = device.startswith("cuda") and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


class Trainer:
    """Test-time LoRA training on one base model, serialised across requests."""

    def __init__(self, model_dir: Path, config: TrainerConfig | None = None) -> None:
        self.config = config or TrainerConfig()
        self.model_dir = Path(model_dir)
        self.dtype = resolve_dtype(self.config.dtype, self.config.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype)
        base.requires_grad_(False)
        lora = LoraConfig(
            r=self.config.rank,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            target_modules=list(self.config.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        # One wrap for the trainer's life; each request re-initialises the LoRA weights in place.
        self.model = get_peft_model(base, lora, adapter_name=_ADAPTER).to(self.config.device)
        self.model.eval()
        self._lora_layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        # The saved names of the adapter's tensors, bound once to the live parameters (which training and
        # re-initialisation update in place), and the adapter config as PEFT writes it.
        self._adapter_tensors = {
            k: v.detach() for k, v in get_peft_model_state_dict(self.model, adapter_name=_ADAPTER).items()
        }
        config_dict = self.model.peft_config[_ADAPTER].to_dict()
        config_dict["base_model_name_or_path"] = str(self.model_dir)
        self._adapter_config_json = json.dumps(config_dict, indent=2, sort_keys=True, default=list)
        self.root = adapter_root(self.config.adapter_dir)
        cleanup_stale(self.root)
        self._lock = threading.Lock()
        self._waiting = 0
        self._waiting_lock = threading.Lock()

    @property
    def base_model(self) -> torch.nn.Module:
        """The frozen base model underneath the adapter layers."""
        return self.model.get_base_model()

    def train(
        self,
        request: TrainRequest,
        cancel: threading.Event | None = None,
        progress: Callable[[TrainStep], None] | None = None,
    ) -> TrainResult:
        """Fit a fresh adapter for `request`; waits for earlier requests. `cancel` stops it within one step
        (or while it waits); `progress` gets a `TrainStep` after each step. Raises TrainerBusyError when
        `max_waiting` requests are already queued."""
        with self._waiting_lock:
            if self._waiting >= self.config.max_waiting:
                raise TrainerBusyError(f"{self._waiting} requests already waiting for the trainer")
            self._waiting += 1
        arrived = time.monotonic()
        try:
            while not self._lock.acquire(timeout=0.05):
                if cancel is not None and cancel.is_set():
                    return TrainResult(None, 0, StopReason.CANCELLED, queue_seconds=time.monotonic() - arrived)
        finally:
            with self._waiting_lock:
                self._waiting -= 1
        try:
            queued = time.monotonic() - arrived
            result = self._train(request, cancel, progress)
        finally:
            self._lock.release()
        result.queue_seconds = queued
        return result

    def _reset_adapter(self, seed: int) -> None:
        torch.manual_seed(seed)
        with torch.no_grad():
            for layer in self._lora_layers:
                layer.reset_lora_parameters(_ADAPTER, True)

    def _tokens(self, text: str, max_tokens: int) -> torch.Tensor:
        ids = self.tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt").input_ids
        return ids.to(self.config.device)

    def _train(
        self,
        request: TrainRequest,
        cancel: threading.Event | None,
        progress: Callable[[TrainStep], None] | None,
    ) -> TrainResult:
        cfg = self.config
        max_steps = cfg.max_steps if request.max_steps is None else request.max_steps
        budget = cfg.time_budget_s if request.time_budget_s is None else request.time_budget_s
        max_tokens = request.max_train_tokens or cfg.max_train_tokens
        self._reset_adapter(cfg.seed if request.seed is None else request.seed)
        optimizer = torch.optim.AdamW(
            self._params,
            lr=request.learning_rate or cfg.learning_rate,
            eps=1e-8,
            weight_decay=cfg.weight_decay,
        )
        losses: list[float] = []
        tokens = 0
        reason: StopReason | None = None
        start = time.monotonic()
        self.model.train()
        try:
            for n, text in enumerate(request.documents, 1):
                elapsed = time.monotonic() - start
                if cancel is not None and cancel.is_set():
                    reason = StopReason.CANCELLED
                elif n > max_steps:
                    reason = StopReason.MAX_STEPS
                elif budget is not None and losses and elapsed + elapsed / len(losses) > budget:
                    reason = StopReason.TIME_BUDGET  # the next step would most likely overrun the budget
                if reason is not None:
                    break
                ids = self._tokens(text, max_tokens)
                if ids.shape[1] < 2:
                    log.warning("%s: skipping document %d: fewer than 2 tokens", request.request_id, n)
                    continue
                loss = self.model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                tokens += int(ids.shape[1])
                if progress is not None:
                    progress(TrainStep(len(losses), losses[-1]))
        finally:
            self.model.eval()
            del optimizer
        train_seconds = time.monotonic() - start
        if cancel is not None and cancel.is_set():
            reason = StopReason.CANCELLED
        reason = reason or request.documents_end
        adapter, export_seconds = None, 0.0
        if losses and reason != StopReason.CANCELLED:
            started = time.monotonic()
            adapter = self.export()
            export_seconds = time.monotonic() - started
        return TrainResult(
            adapter=adapter,
            steps=len(losses),
            stop_reason=reason,
            losses=losses,
            tokens=tokens,
            train_seconds=train_seconds,
            export_seconds=export_seconds,
        )

    def export(self) -> AdapterHandle:
        """Write the current adapter as a PEFT directory under the adapter root; the handle owns it."""
        path = new_adapter_dir(self.root)
        try:
            # What PeftModel.save_pretrained writes, without its model card and state-dict walk (~100 ms).
            save_file(self._adapter_tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
            (path / "adapter_config.json").write_text(self._adapter_config_json)
        except BaseException:
            remove_adapter_dir(path)
            raise
        return AdapterHandle(name=path.name, path=path)

    @torch.no_grad()
    def loss(self, text: str, adapter: bool = True, max_tokens: int | None = None) -> float:
        """Mean next-token loss of `text` under the current adapter (or the base model alone)."""
        ids = self._tokens(text, max_tokens or self.config.max_train_tokens)
        with contextlib.nullcontext() if adapter else self.model.disable_adapter():
            return float(self.model(input_ids=ids, labels=ids).loss)
