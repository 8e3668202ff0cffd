"""`Trainer`: fits a fresh LoRA adapter per prompt on the documents SIFT picked, then hands it over;
concurrent requests train together (continuous batching of training steps).

A plain object (no Ray inside) that loads the base model once. `train` is safe to call from many threads:
each call waits for one of `max_batch` adapter slots, and one loop thread runs the steps. A step takes
the next document of every request holding a slot, pads them into one batch, and runs one forward and
backward of the frozen base model in which each sequence goes through its own slot's LoRA weights
(`LoRABank`); each sequence's loss is the mean over its own tokens and the batch loss is their sum, so a
request's gradient does not depend on its batch-mates. Each slot has its own AdamW state (`SlotAdamW`),
seeded initialisation, step count, learning rate, stopping rule and budget. A request joins at the next
step boundary and leaves when it stops; its adapter is exported the moment it leaves, while the others
go on. Trained in a batch or alone, a request's adapter is the same (within float tolerance).

Per request: one step per picked document in pick order (a repeated pick is another step), causal-LM
loss on the document truncated to `max_train_tokens`. Which documents, and so the adaptive stopping
rule, is selection's decision; the trainer stops early only for `max_steps`, the time budget,
cancellation, or divergence (a non-finite loss or weights: the adapter is discarded, never exported).
A step that raises is retried in halves of its batch, so only the request that causes it fails; an
error outside a step fails the requests it touched and the loop goes on. The base weights are frozen and
never written; the adapter is exported as a PEFT adapter in bytes (`AdapterBlob`): the trainer writes
nothing to disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.config import TrainerConfig
from adapters.handle import AdapterBlob
from adapters.lora_bank import LoRABank
from adapters.slot_adamw import SlotAdamW
from infra.config import resolve_device
from selection.stopping import StopReason

log = logging.getLogger(__name__)

_IDLE_EXIT_S = 5.0  # the loop thread ends after this long without work; the next request starts another


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
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")


@dataclass(frozen=True)
class TrainStep:
    """Progress: optimizer step `step` (1-based) is done, with this training loss."""

    step: int
    loss: float


@dataclass
class TrainResult:
    """The adapter (None when no step was taken, or the request was cancelled or diverged) and what it cost."""

    adapter: AdapterBlob | None
    steps: int
    stop_reason: StopReason
    """The request's `documents_end` when every document was trained on, else max_steps, time_budget,
    cancelled or diverged."""
    losses: list[float] = field(default_factory=list)
    """One finite loss per step taken."""
    tokens: int = 0
    """Tokens trained on (the sum of the steps' sequence lengths)."""
    train_seconds: float = 0.0
    export_seconds: float = 0.0
    queue_seconds: float = 0.0


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        cuda = device.startswith("cuda") and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


@dataclass
class _Job:
    """One request inside the trainer: what it asked for, and where its training stands."""

    request: TrainRequest
    cancel: threading.Event | None
    progress: Callable[[TrainStep], None] | None
    max_steps: int
    budget: float | None
    max_tokens: int
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    slot: int = -1
    position: int = 0
    """Index of the next document to train on."""
    started: float | None = None
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    result: TrainResult | None = None
    error: BaseException | None = None

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


class Trainer:
    """Test-time LoRA training on one base model; concurrent requests share its forward/backward passes."""

    def __init__(self, model_dir: Path, config: TrainerConfig | None = None) -> None:
        config = config or TrainerConfig()
        self.config = config.model_copy(update={"device": resolve_device(config.device)})
        cfg = self.config
        self.model_dir = Path(model_dir)
        self.dtype = resolve_dtype(cfg.dtype, cfg.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype).to(cfg.device)
        self.model.requires_grad_(False)
        self.model.eval()
        # Slots 0..max_batch-1 train; the last one holds a saved adapter for scoring (`adapted`).
        self.bank = LoRABank(
            self.model, list(cfg.target_modules), cfg.max_batch + 1, cfg.rank, cfg.lora_alpha, cfg.lora_dropout
        )
        self.optimizer = SlotAdamW(self.bank.lora_parameters(), eps=1e-8)
        lora = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=str(self.model_dir),
        )
        self._adapter_config_json = json.dumps(lora.to_dict(), indent=2, sort_keys=True, default=list)
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._cond = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._active: list[_Job] = []
        self._free = list(range(cfg.max_batch))
        self._scratch = cfg.max_batch
        self._loop_thread: threading.Thread | None = None

    # ---- the public interface ----------------------------------------------------------------------

    def train(
        self,
        request: TrainRequest,
        cancel: threading.Event | None = None,
        progress: Callable[[TrainStep], None] | None = None,
    ) -> TrainResult:
        """Fit a fresh adapter for `request`, batched with whatever else is training. `cancel` stops it
        within one step (or while it waits); `progress` gets a `TrainStep` after each of its steps (on the
        trainer's loop thread). Raises TrainerBusyError when `max_waiting` requests are already queued."""
        cfg = self.config
        job = _Job(
            request=request,
            cancel=cancel,
            progress=progress,
            max_steps=cfg.max_steps if request.max_steps is None else request.max_steps,
            budget=cfg.time_budget_s if request.time_budget_s is None else request.time_budget_s,
            max_tokens=request.max_train_tokens or cfg.max_train_tokens,
        )
        with self._cond:
            if len(self._waiting) >= cfg.max_waiting:
                raise TrainerBusyError(f"{len(self._waiting)} requests already waiting for the trainer")
            self._waiting.append(job)
            self._ensure_loop()
            self._cond.notify_all()
        while not job.done.wait(0.05):
            if job.cancelled():
                with self._cond:
                    if job in self._waiting:  # never started: nothing to undo
                        self._waiting.remove(job)
                        queued = time.monotonic() - job.arrived
                        return TrainResult(None, 0, StopReason.CANCELLED, queue_seconds=queued)
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def export(self, slot: int) -> AdapterBlob:
        """Slot `slot` as a PEFT adapter in bytes (what PeftModel.save_pretrained would write)."""
        return AdapterBlob.of(self.bank.tensors(slot), self._adapter_config_json)

    @contextlib.contextmanager
    def adapted(self, adapter: AdapterBlob | None) -> Iterator[torch.nn.Module]:
        """The model with a saved adapter (or none: the base model) for one sequence at a time, for scoring.
        Use it while no request is training, or from a `progress` callback."""
        if adapter is None:
            with self.bank.use(None):
                yield self.model
            return
        self.bank.load(self._scratch, adapter.tensors())
        with self.bank.use([self._scratch]):
            yield self.model

    @contextlib.contextmanager
    def training(self, request: TrainRequest) -> Iterator[torch.nn.Module]:
        """The model with `request`'s adapter as trained so far, for one sequence at a time: for scoring
        from the request's own `progress` callback (between its steps)."""
        job = next(j for j in self._active if j.request is request)
        with self.bank.use([job.slot]):
            yield self.model

    @torch.no_grad()
    def loss(self, text: str, adapter: AdapterBlob | None = None, max_tokens: int | None = None) -> float:
        """Mean next-token loss of `text` under a saved adapter (or the base model alone)."""
        ids = self._tokens(text, max_tokens or self.config.max_train_tokens)
        with self.adapted(adapter) as model:
            return float(model(input_ids=ids.unsqueeze(0), labels=ids.unsqueeze(0)).loss)

    # ---- the loop ----------------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_thread is None or not self._loop_thread.is_alive():
            self._loop_thread = threading.Thread(target=self._loop, name="trainer-loop", daemon=True)
            self._loop_thread.start()

    def _loop(self) -> None:
        """Admit, retire, step, until idle. Whatever raises fails only the requests it touched, never the loop
        (a dead loop would leave every later request waiting)."""
        while True:
            with self._cond:
                self._admit()
                if not self._active:
                    if not self._cond.wait(timeout=_IDLE_EXIT_S) and not self._waiting:
                        self._loop_thread = None  # idle: the next request starts a new loop
                        return
                    continue
            for job in list(self._active):
                try:
                    reason = self._stop_reason(job)
                except Exception as exc:
                    self._fail(job, exc)
                    continue
                if reason is not None:
                    self._finish(job, reason)
            jobs = list(self._active)
            try:
                self._step(jobs)
            except Exception as exc:  # a failure `_step` did not pin on one request fails its whole batch
                for job in jobs:
                    self._fail(job, exc)

    def _admit(self) -> None:
        """Give free slots to waiting requests, oldest first (called with the lock held). A request whose
        adapter or optimizer cannot be set up fails alone."""
        while self._free and self._waiting:
            job = self._waiting.popleft()
            job.slot = self._free.pop(0)
            job.started = time.monotonic()
            self._active.append(job)
            try:
                seed = self.config.seed if job.request.seed is None else job.request.seed
                self.bank.reset(job.slot, seed)
                lr = job.request.learning_rate or self.config.learning_rate
                self.optimizer.reset(job.slot, lr, self.config.weight_decay)
            except Exception as exc:
                self._fail(job, exc)

    def _stop_reason(self, job: _Job) -> StopReason | None:
        """Why `job` takes no further step, or None to go on (checked before each of its steps)."""
        if job.cancelled():
            return StopReason.CANCELLED
        if job.position >= len(job.request.documents):
            return job.request.documents_end
        if job.position >= job.max_steps:
            return StopReason.MAX_STEPS
        elapsed = time.monotonic() - (job.started or time.monotonic())
        if job.budget is not None and job.losses and elapsed + elapsed / len(job.losses) > job.budget:
            return StopReason.TIME_BUDGET  # the next step would most likely overrun the budget
        return None

    def _release_slot(self, job: _Job) -> None:
        with self._cond:
            self._active.remove(job)
            self._free.append(job.slot)
            self._free.sort()

    def _finish(self, job: _Job, reason: StopReason) -> None:
        """`job` leaves the batch: export its adapter now (unless cancelled or untrained), free its slot."""
        train_seconds = time.monotonic() - (job.started or job.arrived)
        adapter, export_seconds = None, 0.0
        try:
            if job.losses and reason not in (StopReason.CANCELLED, StopReason.DIVERGED):
                if self.bank.finite(job.slot):
                    started = time.monotonic()
                    adapter = self.export(job.slot)
                    export_seconds = time.monotonic() - started
                else:
                    log.warning("%s: the adapter has non-finite weights; discarded", job.request.request_id)
                    reason = StopReason.DIVERGED
        except Exception as exc:
            self._fail(job, exc)
            return
        self._release_slot(job)
        job.result = TrainResult(
            adapter=adapter,
            steps=len(job.losses),
            stop_reason=reason,
            losses=job.losses,
            tokens=job.tokens,
            train_seconds=train_seconds,
            export_seconds=export_seconds,
            queue_seconds=(job.started or job.arrived) - job.arrived,
        )
        job.done.set()

    def _fail(self, job: _Job, exc: BaseException) -> None:
        if job.done.is_set():  # already answered (finished or failed)
            return
        log.error("%s: training failed: %s", job.request.request_id, exc, exc_info=exc)
        if job in self._active:
            self._release_slot(job)
        job.error = exc
        job.done.set()

    def _tokens(self, text: str, max_tokens: int) -> torch.Tensor:
        ids = self.tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt").input_ids[0]
        return ids.to(self.config.device)

    def _next_sequence(self, job: _Job) -> torch.Tensor | None:
        """The job's next document as token ids, skipping documents too short to predict anything."""
        while job.position < min(len(job.request.documents), job.max_steps):
            ids = self._tokens(job.request.documents[job.position], job.max_tokens)
            job.position += 1
            if ids.numel() >= 2:
                return ids
            log.warning("%s: skipping document %d: fewer than 2 tokens", job.request.request_id, job.position)
        return None

    def _step(self, jobs: list[_Job]) -> None:
        """One optimizer step for each job, in as few forward and backward passes as succeed."""
        batch = []
        for job in jobs:
            try:
                ids = self._next_sequence(job)
            except Exception as exc:
                self._fail(job, exc)
                continue
            if ids is not None:
                batch.append((job, ids))
        self._train(batch)

    def _train(self, batch: list[tuple[_Job, torch.Tensor]]) -> None:
        """One step for `batch`. A forward or backward that raises (out of memory: one long request pads the
        whole batch) is retried in halves, so the request that makes it fail fails alone."""
        if not batch:
            return
        try:
            losses = self._forward_backward(batch)
        except Exception as exc:
            if len(batch) == 1:
                self._fail(batch[0][0], exc)
                return
            log.warning("a training step of %d requests failed (%s); retrying it in halves", len(batch), exc)
            half = len(batch) // 2
            self._train(batch[:half])
            self._train(batch[half:])
            return
        finite = [(job, ids, loss) for (job, ids), loss in zip(batch, losses, strict=True) if math.isfinite(loss)]
        try:
            if finite:
                self.optimizer.step([job.slot for job, _, _ in finite])
        except Exception as exc:
            for job, _ in batch:
                self._fail(job, exc)
            return
        finally:
            for param in self.bank.lora_parameters():
                param.grad = None
        for job, _ in batch:
            if not any(job is j for j, _, _ in finite):
                log.warning("%s: non-finite training loss; the adapter is discarded", job.request.request_id)
                self._finish(job, StopReason.DIVERGED)
        for job, ids, loss in finite:
            job.losses.append(loss)
            job.tokens += ids.numel()
            if job.progress is not None:
                try:
                    job.progress(TrainStep(len(job.losses), loss))
                except Exception:  # a broken callback must not fail the batch
                    log.exception("%s: progress callback failed", job.request.request_id)

    def _forward_backward(self, batch: list[tuple[_Job, torch.Tensor]]) -> list[float]:
        """Each sequence's mean loss over its own tokens; gradients of the finite ones land in their slots
        (a sequence whose loss is not finite contributes no gradient, so its batch-mates are unaffected)."""
        width = max(ids.numel() for _, ids in batch)
        input_ids = torch.full((len(batch), width), self._pad, dtype=torch.long, device=self.config.device)
        mask = torch.zeros_like(input_ids)
        for row, (_, ids) in enumerate(batch):
            input_ids[row, : ids.numel()] = ids
            mask[row, : ids.numel()] = 1
        self.model.train()
        try:
            with self.bank.use([job.slot for job, _ in batch]):
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits
            # Targets are the inputs shifted left, -100 (ignored) past each sequence's end: no copy of the logits.
            targets = torch.nn.functional.pad(input_ids.masked_fill(mask == 0, -100)[:, 1:], (0, 1), value=-100)
            token_loss = torch.nn.functional.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            ).view(targets.shape)
            per_sequence = token_loss.sum(1) / (targets != -100).sum(1)  # each sequence's mean over its tokens
            finite = torch.isfinite(per_sequence)
            if finite.any():
                per_sequence[finite].sum().backward()
        except BaseException:
            for param in self.bank.lora_parameters():
                param.grad = None
            raise
        finally:
            self.model.eval()
        return per_sequence.detach().tolist()
