"""Test-time model merging's maths: expert weights, the exact merged delta, truncation through the factors,
and conformance with the authors' library (`ttmerge`'s `TestTimeMergingModel`) on a tiny random model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from adapters.low_rank import truncate
from adapters.merge import ExpertWeight, MergeOptions, concatenate, expert_weights


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def test_weights_follow_the_kernel_threshold_and_cap():
    keys = unit(np.array([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [0, 0, 1.0]]))
    query = np.array([1.0, 0.05, 0.0])
    chosen = expert_weights(query, keys, MergeOptions(beta=0.5, threshold=0.0, max_experts=50))
    cos = keys @ unit(query)
    u = np.exp(-(1 - cos) / 0.25)
    p = u / u.sum()
    assert [c.expert for c in chosen] == list(np.argsort(-p))
    assert np.allclose([c.weight for c in chosen], np.sort(p)[::-1])
    capped = expert_weights(query, keys, MergeOptions(beta=0.5, threshold=0.0, max_experts=2))
    assert [c.expert for c in capped] == [0, 1]
    assert sum(c.weight for c in capped) == pytest.approx(1.0)
    assert capped[0].weight / capped[1].weight == pytest.approx(p[0] / p[1])
    thresholded = expert_weights(query, keys, MergeOptions(beta=0.5, threshold=0.2, max_experts=50))
    assert [c.expert for c in thresholded] == [int(k) for k in np.argsort(-p) if p[k] > 0.2]


def test_a_tiny_beta_concentrates_on_the_nearest_expert_without_nan():
    keys = unit(np.random.default_rng(0).normal(size=(8, 16)))
    query = keys[3] + 0.01
    chosen = expert_weights(query, keys, MergeOptions(beta=1e-4, threshold=0.01))
    assert chosen == [ExpertWeight(3, 1.0)]


def test_no_expert_above_the_threshold_means_no_merge():
    keys = unit(np.eye(4))
    assert expert_weights(np.ones(4), keys, MergeOptions(beta=1.0, threshold=0.3)) == []
    with pytest.raises(ValueError, match="non-zero"):
        expert_weights(np.zeros(4), keys, MergeOptions())


def test_options_are_checked():
    for bad in ({"beta": 0}, {"threshold": 1.0}, {"max_experts": 0}, {"rank": 0}):
        with pytest.raises(ValueError):
            MergeOptions(**bad)


def test_concatenated_factors_give_the_exact_weighted_sum():
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(r, 12, generator=g) for r in (2, 3, 4)]
    b = [torch.randn(10, r, generator=g) for r in (2, 3, 4)]
    scales = [0.5, 0.3, 0.2]
    merged_a, merged_b = concatenate(a, b, scales)
    assert merged_a.shape == (9, 12) and merged_b.shape == (10, 9)
    dense = sum(s * bk @ ak for ak, bk, s in zip(a, b, scales, strict=True))
    torch.testing.assert_close(merged_b @ merged_a, dense)


def test_truncation_is_the_best_low_rank_approximation():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(24, 40, generator=g, dtype=torch.float64), torch.randn(30, 24, generator=g, dtype=torch.float64)
    dense = b @ a
    cut = truncate(a, b, 5)
    assert cut.a.shape == (5, 40) and cut.b.shape == (30, 5)
    u, s, vh = torch.linalg.svd(dense)
    best = u[:, :5] * s[:5] @ vh[:5]
    torch.testing.assert_close(cut.b @ cut.a, best)
    error = torch.linalg.norm(dense - cut.b @ cut.a) / torch.linalg.norm(dense)
    assert cut.relative_error == pytest.approx(float(error))
    assert torch.linalg.norm(cut.a) == pytest.approx(float(torch.linalg.norm(cut.b)))  # balanced factors
    exact = truncate(a, b, 24)
    assert exact.relative_error == 0.0 and exact.a is a and exact.b is b


def test_truncation_keeps_an_exactly_low_rank_sum():
    g = torch.Generator().manual_seed(2)
    left, right = torch.randn(30, 3, generator=g), torch.randn(3, 40, generator=g)
    a = torch.cat([right, right * 2])  # rank 6 factors of a rank-3 product
    b = torch.cat([left, left], dim=1)
    cut = truncate(a, b, 3)
    assert cut.relative_error < 1e-6
    torch.testing.assert_close(cut.b @ cut.a, b @ a, atol=1e-4, rtol=1e-4)


class _Encoder:
    """The query encoder ttmerge calls: a fixed random map of the prompt's characters (the same vector we
    hand our own rule)."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors

    def encode(self, text: str, convert_to_tensor: bool = True, show_progress_bar: bool = False) -> torch.Tensor:
        return torch.tensor(self.vectors[text], dtype=torch.float32)


@pytest.mark.parametrize("beta, threshold, cap", [(0.2, 0.01, 50), (0.5, 0.05, 3), (1.0, 0.0, 2)])
def test_weights_and_merged_weights_equal_ttmerge(tmp_path, beta, threshold, cap):
    """Our expert weights and merged delta against ttmerge's TestTimeMergingModel, which adds the merged
    delta into the base weights: on a tiny random Llama with random PEFT experts written in its layout."""
    ttmerge = pytest.importorskip("ttmerge", reason="ttmerge is installed by scripts/setup_venv.sh (--no-deps)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.experts import ExpertSet
    from tests.conftest import tiny_llama_dir

    model_dir = tiny_llama_dir(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    experts, rank, alpha = 6, 4, 8.0
    rng = np.random.default_rng(0)
    keys = unit(rng.normal(size=(experts, 16))).astype(np.float32)
    targets = {"q_proj": (32, 32), "v_proj": (16, 32), "down_proj": (32, 64)}
    g = torch.Generator().manual_seed(0)
    for k in range(experts):
        tensors = {}
        for layer in range(2):
            for name, (out, inp) in targets.items():
                part = "mlp" if name == "down_proj" else "self_attn"
                base = f"base_model.model.model.layers.{layer}.{part}.{name}"
                tensors[f"{base}.lora_A.weight"] = torch.randn(rank, inp, generator=g)
                tensors[f"{base}.lora_B.weight"] = torch.randn(out, rank, generator=g)
        (tmp_path / "experts" / str(k)).mkdir(parents=True)
        save_file(tensors, tmp_path / "experts" / str(k) / "adapter_model.safetensors")
        config = {"r": rank, "lora_alpha": alpha, "target_modules": list(targets), "peft_type": "LORA"}
        (tmp_path / "experts" / str(k) / "adapter_config.json").write_text(json.dumps(config))
    prompt = "a prompt"
    query = keys[2] * 0.8 + keys[4] * 0.6 + rng.normal(size=16).astype(np.float32) * 0.1

    oracle = ttmerge.TestTimeMergingModel(
        expert_embeddings=torch.from_numpy(keys),
        tokenizer=tokenizer,
        encoder=_Encoder({prompt: query}),
        base_model=model,
        adapter_location=str(tmp_path / "experts"),
        beta=beta,
        tau=threshold,
        device="cpu",
        max_merge_count=cap,
    )
    seen = {}
    real_merge = oracle._efficient_merge_adapters

    def spy(clusters, weights):  # records what ttmerge decided, then merges with its own code
        seen["weights"] = dict(zip(clusters, weights, strict=True))
        return real_merge(clusters, weights)

    oracle._efficient_merge_adapters = spy
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    # ttmerge decodes the prompt's first tokens to find its query text: the same text comes back
    assert tokenizer.decode(ids[0][:50], skip_special_tokens=True) == prompt
    modified = oracle._load_merged_model(ids)

    options = MergeOptions(beta=beta, threshold=threshold, max_experts=cap, rank=rank * experts)
    ours = {c.expert: c.weight for c in expert_weights(query, keys, options)}
    assert ours.keys() == seen["weights"].keys()
    for k, weight in ours.items():
        assert weight == pytest.approx(seen["weights"][k], rel=1e-5)

    merged = ExpertSet.read([tmp_path / "experts" / str(k) for k in range(experts)], keys).merge(query, options)
    assert merged.relative_error == 0.0 and merged.rank == rank * len(ours)
    tensors = merged.adapter.tensors()
    assert merged.adapter.scaling == 1.0
    assert modified
    for name in modified:
        module = "base_model.model." + name.removesuffix(".weight")
        delta = tensors[f"{module}.lora_B.weight"] @ tensors[f"{module}.lora_A.weight"]
        theirs = dict(model.named_parameters())[name].detach() - before[name]
        torch.testing.assert_close(delta, theirs, atol=1e-5, rtol=1e-4)
