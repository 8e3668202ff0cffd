"""The trainer under failure: an error outside a step, a step that raises for one request's sake, a slot
that diverges, and LoRA dropout when scoring. Each fails only the request it belongs to; the loop lives on."""

from __future__ import annotations

import threading

import pytest
import torch
from pydantic import ValidationError

from adapters.config import TrainerConfig
from adapters.spec import TrainRequest
from adapters.trainer import Trainer
from tests.conftest import STDLIB, tiny_llama_dir, train_request

TEXT = (STDLIB / "bisect.py").read_text()[:1500]
OTHER = (STDLIB / "fnmatch.py").read_text()[:1500]
SHORT = "import bisect\nbisect.insort(a, x)\n"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "llama")


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, list]:
    """Run `fn` in a thread; its result or exception lands in the returned list."""
    out: list = []

    def run() -> None:
        try:
            out.append(fn(*args, **kwargs))
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def alone(tiny_dir, config: TrainerConfig, request: TrainRequest):
    return Trainer(tiny_dir, config).train(request)


def test_trainer_seed_is_range_checked():
    with pytest.raises(ValidationError, match="seed"):
        TrainerConfig(seed=2**64)
    with pytest.raises(ValueError, match="seed"):
        train_request(["a"], seed=2**64)


def test_an_error_at_admission_fails_that_request_and_the_loop_lives_on(tiny_dir, monkeypatch):
    trainer = Trainer(tiny_dir, TrainerConfig())
    reset = trainer.step.bank.reset

    def reset_refusing_666(slot: int, seed: int) -> None:
        if seed == 666:
            raise RuntimeError("Overflow when unpacking long")
        reset(slot, seed)

    monkeypatch.setattr(trainer.step.bank, "reset", reset_refusing_666)
    thread, out = in_thread(trainer.train, train_request([TEXT], seed=666, max_steps=2, max_train_tokens=32))
    thread.join(60)
    assert not thread.is_alive(), "the request hung: the trainer's loop died"
    assert isinstance(out[0], RuntimeError)
    after = trainer.train(train_request([TEXT, OTHER], max_steps=2, max_train_tokens=32))
    assert after.steps == 2 and after.adapter is not None and trainer._free == list(range(4))


def test_a_step_that_raises_is_retried_in_halves_so_only_its_cause_fails(tiny_dir, monkeypatch):
    """Out of memory because one request's long document pads the batch: the short request goes on."""
    spec = dict(max_steps=4, max_train_tokens=64, learning_rate=1e-2)
    trainer = Trainer(tiny_dir, TrainerConfig(max_batch=2))
    forward = trainer.step.model.forward
    widths: list[tuple[int, int]] = []

    def forward_short_only(*args, input_ids, **kwargs):
        widths.append(tuple(input_ids.shape))
        if input_ids.shape[1] > 48:
            raise RuntimeError("out of memory")
        return forward(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(trainer.step.model, "forward", forward_short_only)
    joined = threading.Event()

    def wait_for_the_short_one(step) -> None:  # after its first step, until the other request has queued
        while not trainer._waiting and not joined.is_set():
            joined.wait(0.01)

    long_request = train_request([SHORT, TEXT, TEXT], **spec)
    short_request = train_request([SHORT, OTHER, OTHER], **{**spec, "max_train_tokens": 16})
    thread, long_out = in_thread(trainer.train, long_request, progress=wait_for_the_short_one)
    while not trainer._active:
        joined.wait(0.001)
    short = trainer.train(short_request)
    joined.set()
    thread.join(60)
    assert (2, 64) in widths, "the two requests never shared a step"
    assert isinstance(long_out[0], RuntimeError)
    expected = alone(tiny_dir, TrainerConfig(), short_request)
    assert short.steps == 3 and short.adapter is not None
    assert short.losses == pytest.approx(expected.losses, rel=1e-4)
    assert trainer._free == [0, 1]


def poison(trainer: Trainer, request: TrainRequest) -> None:
    """Set one LoRA weight of `request`'s slot to NaN (what a diverged optimizer step leaves)."""
    slot = trainer.slot(request)
    with torch.no_grad():
        trainer.step.bank.layers[0].lora_b[slot].fill_(float("nan"))


def queued(trainer: Trainer, request: TrainRequest) -> bool:
    """Whether `request` waits for a slot (read under the trainer's lock: `submit` appends from another thread)."""
    with trainer._cond:
        return any(j.request is request for j in trainer._waiting)


def test_a_diverged_slot_is_discarded_and_its_batch_mate_is_unaffected(tiny_dir):
    config = TrainerConfig(max_batch=2)
    spec = dict(max_steps=4, max_train_tokens=32, learning_rate=1e-2)
    trainer = Trainer(tiny_dir, config)
    doomed = train_request([TEXT] * 4, **spec)
    healthy = train_request([OTHER] * 3, **spec)
    started = threading.Event()

    def diverge_after_one(step) -> None:
        if step.step == 1:
            started.set()
            while not queued(trainer, healthy):  # queued: it joins the next step
                started.wait(0.01)
            poison(trainer, doomed)

    thread, out = in_thread(trainer.train, doomed, progress=diverge_after_one)
    started.wait(60)
    result = trainer.train(healthy)
    thread.join(60)
    bad = out[0]
    assert (bad.stop_reason, bad.adapter, bad.steps) == ("diverged", None, 1)
    assert all(torch.isfinite(torch.tensor(bad.losses)))
    expected = alone(tiny_dir, config, healthy)
    assert result.steps == 3 and result.losses == pytest.approx(expected.losses, rel=1e-4)
    assert trainer._free == [0, 1]


def test_non_finite_weights_after_the_last_step_are_never_exported(tiny_dir):
    trainer = Trainer(tiny_dir, TrainerConfig())
    request = train_request([TEXT], max_steps=2, max_train_tokens=32)
    result = trainer.train(request, progress=lambda step: poison(trainer, request))
    assert (result.stop_reason, result.adapter, result.steps) == ("diverged", None, 1)


def test_lora_dropout_is_off_when_scoring(tiny_dir):
    """Scored in the trainer's own model (the request's slot after its last step): deterministic with the
    model in eval mode, and dropout on while it trains."""
    trainer = Trainer(tiny_dir, TrainerConfig(lora_dropout=0.5))
    request = train_request([TEXT, OTHER], max_steps=2, max_train_tokens=32)
    ids = trainer.step.tokenizer(OTHER, return_tensors="pt").input_ids[:, :32]
    scored: dict[str, bool] = {}

    def score_after_the_last_step(step) -> None:
        if step.step != 2:
            return
        with trainer.step.use(trainer.slot(request)) as model:
            loss = [float(model(input_ids=ids, labels=ids).loss) for _ in range(2)]
            scored["scoring is deterministic"] = loss[0] == loss[1]
            model.train()
            try:
                scored["training is not"] = not torch.equal(model(ids).logits, model(ids).logits)
            finally:
                model.eval()

    result = trainer.train(request, progress=score_after_the_last_step)
    assert result.steps == 2 and result.adapter is not None
    assert scored == {"scoring is deterministic": True, "training is not": True}
