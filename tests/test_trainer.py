"""The test-time trainer on a tiny random Llama: learning, export, isolation, stopping, cleanup."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.config import LayerScope, TrainerConfig
from adapters.handle import AdapterBlob, cleanup_stale
from adapters.spec import TrainRequest
from adapters.trainer import Trainer, TrainerBusyError, TrainTicket
from selection.stopping import StopReason
from tests.conftest import STDLIB, adapter_loss, tiny_llama_dir, train_request

TEXT = (STDLIB / "bisect.py").read_text()[:1500]
OTHER = (STDLIB / "fnmatch.py").read_text()[:1500]
SPEC = dict(learning_rate=1e-2, max_steps=8, max_train_tokens=64)
"""How the `trainer` fixture's requests train (unless a test says otherwise)."""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture()
def trainer(tiny_dir):
    return Trainer(tiny_dir, TrainerConfig())


def base_snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.step.model.state_dict().items() if "lora_" not in k}


def submit_cancelled_after(trainer: Trainer, request: TrainRequest, steps: int) -> TrainTicket:
    """Submit `request` with a progress callback that cancels it once `steps` steps are done (a deterministic
    disconnect between two steps)."""
    tickets: list[TrainTicket] = []
    submitted = threading.Event()

    def progress(done) -> None:
        if done.step >= steps:
            submitted.wait(30)
            tickets[0].cancel()

    tickets.append(trainer.submit(request, progress))
    submitted.set()
    return tickets[0]


def test_training_lowers_the_loss_on_the_document(trainer, tiny_dir):
    before = adapter_loss(tiny_dir, TEXT, max_tokens=64)
    result = trainer.train(train_request([TEXT] * 5, **SPEC))
    assert result.steps == 5 and result.stop_reason == "max_steps" and result.adapter is not None
    assert adapter_loss(tiny_dir, TEXT, result.adapter, max_tokens=64) < before - 0.05
    assert result.losses[-1] < result.losses[0]
    assert result.tokens == 5 * 64 and result.train_seconds > 0 and result.export_seconds > 0


def test_saved_adapter_reproduces_the_in_memory_model(trainer, tiny_dir, tmp_path):
    request = train_request([TEXT, OTHER, TEXT], **SPEC)
    ids = trainer.step.tokenizer(OTHER[:200], return_tensors="pt").input_ids
    in_memory: list[torch.Tensor] = []

    def score_after_the_last_step(done) -> None:  # the slot as trained, before it is exported
        if done.step == 3:
            with trainer.step.use(trainer.slot(request)) as model:
                in_memory.append(model(ids).logits)

    result = trainer.train(request, progress=score_after_the_last_step)
    assert result.steps == 3 and len(in_memory) == 1
    handle = result.adapter.write(tmp_path)
    files = sorted(p.name for p in handle.path.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), handle.path).eval()
    assert loaded.peft_config["default"].base_model_name_or_path == str(tiny_dir)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, in_memory[0], atol=1e-5)
    handle.release()
    assert not handle.path.exists() and list(tmp_path.iterdir()) == []


def test_upper_half_adapts_only_the_upper_layers_and_peft_loads_it(tiny_dir, tmp_path):
    trainer = Trainer(tiny_dir, TrainerConfig(layers=LayerScope.UPPER_HALF, max_batch=1))
    assert {layer.name.split(".")[2] for layer in trainer.step.bank.layers} == {"1"}  # layer 1 of the tiny model's 2
    request = train_request([TEXT, OTHER, TEXT], **SPEC)
    ids = trainer.step.tokenizer(OTHER[:200], return_tensors="pt").input_ids
    in_memory: list[torch.Tensor] = []

    def score(done) -> None:
        if done.step == 3:
            with trainer.step.use(trainer.slot(request)) as model:
                in_memory.append(model(ids).logits)

    def needs_grad(_module, _inputs, out) -> None:  # layer 0's output needs a gradient only if layer 0 is adapted
        reached.append((out[0] if isinstance(out, tuple) else out).requires_grad)

    reached: list[bool] = []
    hook = trainer.step.model.model.layers[0].register_forward_hook(needs_grad)
    result = trainer.train(request, progress=score)
    hook.remove()
    assert result.steps == 3 and reached and not any(reached)
    assert all(".layers.1." in name for name in result.adapter.tensors())
    assert json.loads(result.adapter.config_json)["layers_to_transform"] == [1]
    handle = result.adapter.write(tmp_path)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), handle.path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, in_memory[0], atol=1e-5)
    handle.release()


def test_base_weights_stay_bit_identical(trainer):
    before = base_snapshot(trainer)
    for request in (train_request([TEXT] * 3, **SPEC), train_request([OTHER], **{**SPEC, "learning_rate": 0.5})):
        trainer.train(request)
    submit_cancelled_after(trainer, train_request([TEXT] * 3, **SPEC), 2).future.result()
    after = base_snapshot(trainer)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_requests_never_see_each_others_adapter_or_optimizer(trainer, tiny_dir):
    trainer.train(train_request([OTHER] * 4, **{**SPEC, "learning_rate": 0.05}))
    second = trainer.train(train_request([TEXT] * 2, **SPEC))
    fresh = Trainer(tiny_dir, trainer.config)
    alone = fresh.train(train_request([TEXT] * 2, **SPEC))
    a, b = second.adapter.tensors(), alone.adapter.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second.losses == alone.losses


def test_stopping_rules(trainer):
    docs = [TEXT, OTHER, TEXT, OTHER, TEXT]
    capped = trainer.train(train_request(docs, **{**SPEC, "max_steps": 2}))
    assert (capped.steps, capped.stop_reason) == (2, "max_steps")
    # Every document trained on: the reason is why selection ended the list (here, adaptive SIFT).
    adaptive = trainer.train(train_request(docs[:2], StopReason.ALPHA, **SPEC))
    assert (adaptive.steps, adaptive.stop_reason) == (2, "alpha")
    budget = trainer.train(train_request(docs * 4, **{**SPEC, "time_budget_s": 1e-6}))
    assert (budget.steps, budget.stop_reason) == (1, "time_budget")
    zero = trainer.train(train_request(docs, **{**SPEC, "max_steps": 0}))
    assert (zero.steps, zero.stop_reason, zero.adapter) == (0, "max_steps", None)
    empty = trainer.train(train_request([], **SPEC))
    assert (empty.steps, empty.adapter) == (0, None)


def test_cancellation_stops_within_a_step_and_leaves_nothing(trainer, tiny_dir):
    result = submit_cancelled_after(trainer, train_request([TEXT] * 6, **SPEC), 2).future.result()
    assert (result.steps, result.stop_reason, result.adapter) == (2, "cancelled", None)
    # Cancelled before it starts: it waits while the only slot is busy.
    one_slot = Trainer(tiny_dir, trainer.config.model_copy(update={"max_batch": 1}))
    running, release = threading.Event(), threading.Event()

    def hold_the_slot(done) -> None:
        running.set()
        release.wait(30)

    holder = one_slot.submit(train_request([TEXT] * 2, **SPEC), hold_the_slot)
    try:
        assert running.wait(30)
        waiting = one_slot.submit(train_request([TEXT], **SPEC))
        waiting.cancel()
        assert waiting.future.done()
        early = waiting.future.result()
        assert (early.steps, early.stop_reason, early.adapter) == (0, "cancelled", None)
    finally:
        release.set()
    assert holder.future.result().steps == 2


def test_a_failed_export_fails_its_request_and_the_trainer_goes_on(trainer, monkeypatch):
    import adapters.handle as module

    def broken(*args, **kwargs):
        raise OSError("out of memory")

    monkeypatch.setattr(module, "save", broken)
    with pytest.raises(OSError, match="out of memory"):
        trainer.train(train_request([TEXT], **SPEC))
    monkeypatch.undo()
    assert trainer.train(train_request([TEXT], **SPEC)).adapter is not None


def test_adapter_files_on_a_shared_root_stay_per_host(trainer, tmp_path):
    blob = trainer.train(train_request([TEXT], **SPEC)).adapter
    with blob.write(tmp_path) as handle:
        host, pid, _ = handle.name.split("__")
        assert host == socket.gethostname().replace("_", "-") and int(pid) == os.getpid()
        assert sorted(p.name for p in handle.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError):
        AdapterBlob(config_json=None, weights=b"x").write(tmp_path)  # a failed write leaves no directory
    assert list(tmp_path.iterdir()) == []


def test_requests_queue_for_a_slot_and_report_their_wait(tiny_dir):
    trainer = Trainer(tiny_dir, TrainerConfig(max_batch=1))
    results, first_started = {}, threading.Event()

    def run(name: str, progress=None) -> None:
        results[name] = trainer.train(train_request([TEXT] * 3, max_steps=8), progress=progress)

    first = threading.Thread(target=run, args=("first", lambda step: first_started.set()))
    first.start()
    first_started.wait(30)
    run("second")
    first.join()
    assert results["second"].queue_seconds > 0.01
    assert results["first"].losses == results["second"].losses


def test_a_full_queue_is_refused(tiny_dir):
    trainer = Trainer(tiny_dir, TrainerConfig(max_batch=1, max_waiting=1))
    running = threading.Event()
    long = train_request([TEXT] * 1000, max_steps=1000, time_budget_s=None)
    holder = trainer.submit(long, lambda step: running.set())
    running.wait(30)
    waiter = trainer.submit(train_request([TEXT], max_steps=1000))
    assert len(trainer._waiting) == 1
    with pytest.raises(TrainerBusyError):
        trainer.train(train_request([TEXT], max_steps=1000))
    waiter.cancel()
    holder.cancel()
    waiter.future.result()
    holder.future.result()
    assert len(trainer._waiting) == 0 and trainer._free == [0]


def test_stale_directories_of_dead_processes_are_removed(tmp_path):
    host = socket.gethostname().replace("_", "-")
    dead = tmp_path / f"{host}__{2**22 + 12345}__{'a' * 32}"
    mine = tmp_path / f"{host}__{os.getpid()}__{'b' * 32}"
    other_host = tmp_path / f"elsewhere.example__{2**22 + 12345}__{'c' * 32}"  # a shared volume: not ours
    other = tmp_path / "not-an-adapter"
    for d in (dead, mine, other_host, other):
        d.mkdir()
    assert cleanup_stale(tmp_path) == 1
    assert not dead.exists() and mine.exists() and other_host.exists() and other.exists()


@pytest.mark.parametrize(
    "documents,spec,message",
    [
        ("one string", {}, "sequence of strings"),
        (["a"], {"learning_rate": -1.0}, "learning_rate"),
        (["a"], {"max_steps": -1}, "max_steps"),
        (["a"], {"max_train_tokens": 1}, "max_train_tokens"),
    ],
)
def test_bad_requests_are_clear_errors(documents, spec, message):
    default = train_request([]).spec
    with pytest.raises(ValueError, match=message):
        TrainRequest(documents, dataclasses.replace(default, **spec))
