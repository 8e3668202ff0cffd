"""The test-time trainer on a tiny random Llama: learning, export, isolation, stopping, cleanup."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.config import TrainerConfig
from adapters.handle import AdapterBlob, cleanup_stale
from adapters.trainer import Trainer, TrainerBusyError, TrainRequest
from selection.stopping import StopReason
from tests.conftest import STDLIB, tiny_llama_dir

TEXT = (STDLIB / "bisect.py").read_text()[:1500]
OTHER = (STDLIB / "fnmatch.py").read_text()[:1500]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture()
def trainer(tiny_dir):
    return Trainer(tiny_dir, TrainerConfig(learning_rate=1e-2, max_steps=8, max_train_tokens=64))


def base_snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" not in k}


def cancel_after(steps: int) -> tuple[threading.Event, object]:
    """A cancel flag and a progress callback that sets it once `steps` steps are done (a deterministic
    disconnect between two steps)."""
    cancel = threading.Event()

    def progress(done) -> None:
        if done.step >= steps:
            cancel.set()

    return cancel, progress


def test_training_lowers_the_loss_on_the_document(trainer):
    before = trainer.loss(TEXT)
    result = trainer.train(TrainRequest(documents=[TEXT] * 5))
    assert result.steps == 5 and result.stop_reason == "max_steps" and result.adapter is not None
    assert trainer.loss(TEXT, result.adapter) < before - 0.05
    assert result.losses[-1] < result.losses[0]
    assert result.tokens == 5 * 64 and result.train_seconds > 0 and result.export_seconds > 0


def test_saved_adapter_reproduces_the_in_memory_model(trainer, tiny_dir, tmp_path):
    result = trainer.train(TrainRequest(documents=[TEXT, OTHER, TEXT]))
    handle = result.adapter.write(tmp_path)
    files = sorted(p.name for p in handle.path.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), handle.path).eval()
    assert loaded.peft_config["default"].base_model_name_or_path == str(tiny_dir)
    ids = trainer.tokenizer(OTHER[:200], return_tensors="pt").input_ids
    with torch.no_grad(), trainer.adapted(result.adapter) as model:
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    handle.release()
    assert not handle.path.exists() and list(tmp_path.iterdir()) == []


def test_base_weights_stay_bit_identical(trainer):
    before = base_snapshot(trainer)
    for request in (TrainRequest(documents=[TEXT] * 3), TrainRequest(documents=[OTHER], learning_rate=0.5)):
        trainer.train(request)
    trainer.train(TrainRequest(documents=[TEXT] * 3), *cancel_after(2))
    after = base_snapshot(trainer)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_requests_never_see_each_others_adapter_or_optimizer(trainer, tiny_dir):
    trainer.train(TrainRequest(documents=[OTHER] * 4, learning_rate=0.05))
    second = trainer.train(TrainRequest(documents=[TEXT] * 2))
    fresh = Trainer(tiny_dir, trainer.config)
    alone = fresh.train(TrainRequest(documents=[TEXT] * 2))
    a, b = second.adapter.tensors(), alone.adapter.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second.losses == alone.losses


def test_stopping_rules(trainer):
    docs = [TEXT, OTHER, TEXT, OTHER, TEXT]
    capped = trainer.train(TrainRequest(documents=docs, max_steps=2))
    assert (capped.steps, capped.stop_reason) == (2, "max_steps")
    # Every document trained on: the reason is why selection ended the list (here, adaptive SIFT).
    adaptive = trainer.train(TrainRequest(documents=docs[:2], documents_end=StopReason.ALPHA))
    assert (adaptive.steps, adaptive.stop_reason) == (2, "alpha")
    budget = trainer.train(TrainRequest(documents=docs * 4, time_budget_s=1e-6))
    assert (budget.steps, budget.stop_reason) == (1, "time_budget")
    zero = trainer.train(TrainRequest(documents=docs, max_steps=0))
    assert (zero.steps, zero.stop_reason, zero.adapter) == (0, "max_steps", None)
    empty = trainer.train(TrainRequest(documents=[]))
    assert (empty.steps, empty.adapter) == (0, None)


def test_cancellation_stops_within_a_step_and_leaves_nothing(trainer):
    result = trainer.train(TrainRequest(documents=[TEXT] * 6), *cancel_after(2))
    assert (result.steps, result.stop_reason, result.adapter) == (2, "cancelled", None)
    before = threading.Event()
    before.set()
    assert trainer.train(TrainRequest(documents=[TEXT]), cancel=before).steps == 0


def test_a_failed_export_fails_its_request_and_the_trainer_goes_on(trainer, monkeypatch):
    import adapters.handle as module

    def broken(*args, **kwargs):
        raise OSError("out of memory")

    monkeypatch.setattr(module, "save", broken)
    with pytest.raises(OSError, match="out of memory"):
        trainer.train(TrainRequest(documents=[TEXT]))
    monkeypatch.undo()
    assert trainer.train(TrainRequest(documents=[TEXT])).adapter is not None


def test_adapter_files_on_a_shared_root_stay_per_host(trainer, tmp_path):
    blob = trainer.train(TrainRequest(documents=[TEXT])).adapter
    with blob.write(tmp_path) as handle:
        host, pid, _ = handle.name.split("__")
        assert host == socket.gethostname().replace("_", "-") and int(pid) == os.getpid()
        assert sorted(p.name for p in handle.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError):
        AdapterBlob(config_json=None, weights=b"x").write(tmp_path)  # a failed write leaves no directory
    assert list(tmp_path.iterdir()) == []


def test_requests_queue_for_a_slot_and_report_their_wait(tiny_dir):
    trainer = Trainer(tiny_dir, TrainerConfig(max_batch=1, max_steps=8))
    results, first_started = {}, threading.Event()

    def run(name: str, progress=None) -> None:
        results[name] = trainer.train(TrainRequest(documents=[TEXT] * 3), progress=progress)

    first = threading.Thread(target=run, args=("first", lambda step: first_started.set()))
    first.start()
    first_started.wait(30)
    run("second")
    first.join()
    assert results["second"].queue_seconds > 0.01
    assert results["first"].losses == results["second"].losses


def test_a_full_queue_is_refused(tiny_dir):
    trainer = Trainer(tiny_dir, TrainerConfig(max_batch=1, max_waiting=1, max_steps=1000))
    running, stop = threading.Event(), threading.Event()
    long = TrainRequest(documents=[TEXT] * 1000, time_budget_s=None)
    holder = threading.Thread(target=lambda: trainer.train(long, stop, lambda step: running.set()))
    holder.start()
    running.wait(30)
    waiter = threading.Thread(target=lambda: trainer.train(TrainRequest(documents=[TEXT]), stop))
    waiter.start()
    while len(trainer._waiting) == 0:
        time.sleep(0.001)
    with pytest.raises(TrainerBusyError):
        trainer.train(TrainRequest(documents=[TEXT]))
    stop.set()
    holder.join()
    waiter.join()
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
    "kwargs,message",
    [
        ({"documents": "one string"}, "sequence of strings"),
        ({"documents": ["a"], "learning_rate": -1.0}, "learning_rate"),
        ({"documents": ["a"], "max_steps": -1}, "max_steps"),
        ({"documents": ["a"], "max_train_tokens": 1}, "max_train_tokens"),
    ],
)
def test_bad_requests_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainRequest(**kwargs)
