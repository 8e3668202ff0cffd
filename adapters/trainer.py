"""`Trainer`: schedules test-time training. Each request fits a fresh LoRA adapter on the documents SIFT
picked, and concurrent requests train together (continuous batching of training steps).

A plain object (no Ray inside). `submit` queues a request and returns at once with a `TrainTicket`: the
result as a future, and `cancel`. One loop thread admits waiting requests into the `max_batch` adapter
slots of a `BatchedStep`, checks who stops, and runs one batched step for everyone else; a request joins
at the next step boundary and leaves when it stops, its adapter exported the moment it leaves, while the
others go on. Nobody else waits on a thread or polls: results and progress are handed to callbacks.

Per request: one step per picked document in pick order (a repeated pick is another step), causal-LM
loss on the document truncated to `spec.max_train_tokens`. Which documents, and so the adaptive stopping
rule, is selection's decision; the trainer stops early only for `spec.max_steps`, the time budget,
cancellation, or divergence (a non-finite loss or weights: the adapter is discarded, never exported). A
forward or backward that raises is retried in halves of its batch, so only the request that causes it
fails (an optimizer step that raises fails its whole batch); an error outside a step fails the requests it
touched and the loop goes on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters.batched_step import BatchedStep, OptimizerStepError
from adapters.config import TrainerConfig
from adapters.spec import TrainRequest, TrainResult, TrainStep
from infra.config import resolve_device
from selection.stopping import StopReason

log = logging.getLogger(__name__)

_IDLE_EXIT_S = 5.0  # the loop thread ends after this long without work; the next request starts another

Progress = Callable[[TrainStep], None]


class TrainerBusyError(RuntimeError):
    """Too many requests are already waiting for the trainer."""


@dataclass(eq=False)
class _Job:
    """One request inside the trainer: what it asked for, and where its training stands."""

    request: TrainRequest
    progress: Progress | None
    future: Future[TrainResult] = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    slot: int = -1
    position: int = 0
    """Index of the next document to train on."""
    started: float | None = None
    losses: list[float] = field(default_factory=list)
    tokens: int = 0


class TrainTicket:
    """A submitted request: `future` resolves to its `TrainResult` (or its error); `cancel` stops it at the
    next step boundary, or at once while it still waits for a slot."""

    def __init__(self, trainer: Trainer, job: _Job) -> None:
        self._trainer, self._job = trainer, job
        self.future: Future[TrainResult] = job.future

    def cancel(self) -> None:
        self._trainer._cancel(self._job)


class Trainer:
    """Test-time LoRA training on one base model; concurrent requests share its forward/backward passes."""

    def __init__(self, model_dir: Path, config: TrainerConfig | None = None) -> None:
        config = config or TrainerConfig()
        self.config = config.model_copy(update={"device": resolve_device(config.device)})
        self.step = BatchedStep(model_dir, self.config)
        self._cond = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._active: list[_Job] = []
        self._free = list(range(self.config.max_batch))
        self._loop_thread: threading.Thread | None = None

    def submit(self, request: TrainRequest, progress: Progress | None = None) -> TrainTicket:
        """Queue `request` to train, batched with whatever else is training. `progress` gets a `TrainStep`
        after each of its steps (on the trainer's loop thread). Raises TrainerBusyError when `max_waiting`
        requests are already queued."""
        job = _Job(request, progress)
        with self._cond:
            if len(self._waiting) >= self.config.max_waiting:
                raise TrainerBusyError(f"{len(self._waiting)} requests already waiting for the trainer")
            self._waiting.append(job)
            self._ensure_loop()
            self._cond.notify_all()
        return TrainTicket(self, job)

    def train(self, request: TrainRequest, progress: Progress | None = None) -> TrainResult:
        """`submit`, and wait for the result (for scripts and benchmarks)."""
        ticket = self.submit(request, progress)
        try:
            return ticket.future.result()
        finally:
            ticket.cancel()  # a no-op once it is done; stops the training if this thread was interrupted

    def slot(self, request: TrainRequest) -> int:
        """The slot `request` trains in (while it trains): `step.use(slot)` scores its adapter so far, from
        its own `progress` callback."""
        return next(job.slot for job in self._active if job.request is request)

    # ---- the loop ----------------------------------------------------------------------------------

    def _cancel(self, job: _Job) -> None:
        with self._cond:
            job.cancelled = True
            if job in self._waiting:  # never started: nothing to undo
                self._waiting.remove(job)
                queued = time.monotonic() - job.arrived
                _settle(job.future, TrainResult(None, 0, StopReason.CANCELLED, queue_seconds=queued))

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
                self._train(self._next_rows(jobs))
            except Exception as exc:  # a failure not pinned on one request fails its whole batch
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
                spec, request = job.request.spec, job.request
                if request.resume is not None:
                    self.step.restore(job.slot, request.resume, spec.learning_rate)
                else:
                    self.step.reset(job.slot, spec.seed, spec.learning_rate, request.initial)
            except Exception as exc:
                self._fail(job, exc)

    def _stop_reason(self, job: _Job) -> StopReason | None:
        """Why `job` takes no further step, or None to go on (checked before each of its steps)."""
        spec = job.request.spec
        if job.cancelled:
            return StopReason.CANCELLED
        if job.position >= len(job.request.documents):
            return job.request.documents_end
        if job.position >= spec.max_steps:
            return StopReason.MAX_STEPS
        elapsed, budget = time.monotonic() - (job.started or time.monotonic()), spec.time_budget_s
        if budget is not None and job.losses and elapsed + elapsed / len(job.losses) > budget:
            return StopReason.TIME_BUDGET  # the next step would most likely overrun the budget
        return None

    def _release_slot(self, job: _Job) -> None:
        with self._cond:
            self._active.remove(job)
            self._free = sorted([*self._free, job.slot])

    def _finish(self, job: _Job, reason: StopReason) -> None:
        """`job` leaves the batch: export its adapter now (unless cancelled or untrained), free its slot."""
        train_seconds = time.monotonic() - (job.started or job.arrived)
        adapter, export_seconds, state = None, 0.0, None
        try:
            if job.losses and reason not in (StopReason.CANCELLED, StopReason.DIVERGED):
                if self.step.finite(job.slot):
                    started = time.monotonic()
                    adapter = self.step.export(job.slot)
                    if job.request.keep_state:
                        state = self.step.snapshot(job.slot)
                    export_seconds = time.monotonic() - started
                else:
                    log.warning("%s: the adapter has non-finite weights; discarded", job.request.request_id)
                    reason = StopReason.DIVERGED
        except Exception as exc:
            self._fail(job, exc)
            return
        self._release_slot(job)
        result = TrainResult(
            adapter=adapter,
            steps=len(job.losses),
            stop_reason=reason,
            losses=tuple(job.losses),
            tokens=job.tokens,
            train_seconds=train_seconds,
            export_seconds=export_seconds,
            queue_seconds=(job.started or job.arrived) - job.arrived,
            state=state,
        )
        _settle(job.future, result)

    def _fail(self, job: _Job, exc: BaseException) -> None:
        if job.future.done():  # already answered (finished or failed)
            return
        log.error("%s: training failed: %s", job.request.request_id, exc, exc_info=exc)
        if job in self._active:
            self._release_slot(job)
        _settle(job.future, exc)

    def _next_rows(self, jobs: list[_Job]) -> list[tuple[_Job, torch.Tensor]]:
        """Each job's next document as token ids, skipping documents too short to predict anything."""
        rows = []
        for job in jobs:
            spec, documents = job.request.spec, job.request.documents
            try:
                while job.position < min(len(documents), spec.max_steps):
                    ids = self.step.tokens(documents[job.position], spec.max_train_tokens)
                    job.position += 1
                    if ids.numel() >= 2:
                        rows.append((job, ids))
                        break
                    log.warning("%s: skipping document %d: under 2 tokens", job.request.request_id, job.position)
            except Exception as exc:
                self._fail(job, exc)
        return rows

    def _train(self, rows: list[tuple[_Job, torch.Tensor]]) -> None:
        """One step for `rows`. A forward or backward that raises (out of memory: one long request pads the
        whole batch) is retried in halves, so the request that makes it fail fails alone."""
        if not rows:
            return
        try:
            losses = self.step.run([(job.slot, ids) for job, ids in rows])
        except OptimizerStepError as exc:
            for job, _ in rows:
                self._fail(job, exc.__cause__ or exc)
            return
        except Exception as exc:
            if len(rows) == 1:
                self._fail(rows[0][0], exc)
                return
            log.warning("a training step of %d requests failed (%s); retrying it in halves", len(rows), exc)
            half = len(rows) // 2
            self._train(rows[:half])
            self._train(rows[half:])
            return
        for (job, ids), loss in zip(rows, losses, strict=True):
            if not math.isfinite(loss):
                log.warning("%s: non-finite training loss; the adapter is discarded", job.request.request_id)
                self._finish(job, StopReason.DIVERGED)
                continue
            job.losses.append(loss)
            job.tokens += ids.numel()
            if job.progress is not None:
                try:
                    job.progress(TrainStep(len(job.losses), loss))
                except Exception:  # a broken callback must not fail the batch
                    log.exception("%s: progress callback failed", job.request.request_id)


def _settle(future: Future[TrainResult], outcome: TrainResult | BaseException) -> None:
    """Answer a request once (a cancel and a finish may race)."""
    with contextlib.suppress(InvalidStateError):
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
