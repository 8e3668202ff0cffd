"""Expert adapters: balanced clusters, `sift-serve experts build` (resumable, refusing experts of another
index, model or plan), merged adapters as training's starting point, and the `merge` modes through the
official `openai` client against the in-process server (tiny random Llama, real MiniLM index)."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import openai
import pytest
import torch
from typer.testing import CliRunner

from adapters.config import TrainerConfig
from adapters.expert_build import build_experts, plan_for
from adapters.experts import (
    EXPERTS_DIR,
    ExpertManifest,
    ExpertSet,
    ExpertsMismatchError,
    NoExpertsError,
    experts_dir,
    unavailable,
)
from adapters.merge import MergeOptions
from selection.clusters import balanced_clusters, cluster_keys
from serving.app import create_app
from serving.openai_server import local_server
from tests.conftest import in_process_client, tiny_app_settings, tiny_llama_dir

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "How do I read rows from a CSV file?"}]
CONFIG = TrainerConfig(max_batch=4)
PLAN = plan_for(CONFIG, experts=4, steps=2, learning_rate=1e-3, max_train_tokens=32)


def test_balanced_clusters_and_their_keys():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(loc, 0.1, size=(n, 8)) for loc, n in ((0, 70), (3, 20), (-3, 13))])
    labels = balanced_clusters(x, 6, seed=0)
    sizes = np.bincount(labels, minlength=6)
    assert sizes.sum() == 103 and sizes.min() >= 103 // 12 and sizes.max() <= 2 * 103 // 6 + 1
    assert np.array_equal(labels, balanced_clusters(x, 6, seed=0))
    keys = cluster_keys(x, labels, 6)
    assert np.allclose(np.linalg.norm(keys, axis=1), 1.0)
    mean = x[labels == 2].mean(0)
    assert np.allclose(keys[2], mean / np.linalg.norm(mean), atol=1e-6)
    with pytest.raises(ValueError, match="clusters"):
        balanced_clusters(x, 104)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / MODEL)


@pytest.fixture(scope="module")
def expert_index(small_index, tmp_path_factory, tiny):
    """A copy of the small index with 4 experts of the tiny model built beside it."""
    directory = tmp_path_factory.mktemp("experts-index") / "idx"
    shutil.copytree(small_index.directory, directory)
    build_experts(directory, tiny, CONFIG, PLAN, progress=False)
    return directory


def test_build_writes_experts_the_server_and_ttmerge_layout_read(expert_index, tiny):
    directory = experts_dir(expert_index)
    manifest = ExpertManifest.read(directory)
    assert manifest.plan == PLAN and sum(manifest.sizes) == manifest.index.count and min(manifest.sizes) > 0
    for k in range(4):
        config = json.loads((directory / str(k) / "adapter_config.json").read_text())
        assert config["r"] == CONFIG.rank and (directory / str(k) / "adapter_model.safetensors").is_file()
    assert unavailable(expert_index, tiny) is None
    experts = ExpertSet.load(expert_index, tiny)
    assert len(experts) == 4 and np.allclose(np.linalg.norm(experts.keys, axis=1), 1.0)


def test_an_interrupted_build_resumes_and_mismatches_are_refused(expert_index, tiny, tmp_path):
    directory = experts_dir(expert_index)
    untouched = (directory / "0" / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(directory / "2")  # as if the build stopped before expert 2 was written
    assert "2 of 4" not in (unavailable(expert_index, tiny) or "") and "3 of 4" in unavailable(expert_index, tiny)
    build_experts(expert_index, tiny, CONFIG, PLAN, progress=False)
    assert (directory / "2" / "adapter_model.safetensors").is_file()
    assert (directory / "0" / "adapter_model.safetensors").read_bytes() == untouched  # not retrained
    with pytest.raises(ExpertsMismatchError, match="--overwrite"):
        build_experts(expert_index, tiny, CONFIG, PLAN.model_copy(update={"steps": 3}), progress=False)
    other = tiny_llama_dir(tmp_path / MODEL, seed=1)  # same name and shape, other weights
    with pytest.raises(ExpertsMismatchError, match="another base model"):
        build_experts(expert_index, other, CONFIG, PLAN, progress=False)
    assert "another base model" in unavailable(expert_index, other)


def test_no_experts_is_said_plainly(small_index, tiny):
    with pytest.raises(NoExpertsError, match="sift-serve experts build"):
        ExpertSet.load(small_index.directory, tiny)


def test_a_merge_is_the_weighted_sum_of_its_experts(expert_index, tiny):
    experts = ExpertSet.load(expert_index, tiny)
    query = experts.keys[1] + 0.3 * experts.keys[3]
    exact = experts.merge(query, MergeOptions(beta=0.5, threshold=0.0, rank=4 * CONFIG.rank))
    assert exact.relative_error == 0.0 and [e.expert for e in exact.experts][:2] == [1, 3]
    merged = exact.adapter.tensors()
    directory = experts_dir(expert_index)
    from safetensors.torch import load_file

    parts = {e.expert: load_file(directory / str(e.expert) / "adapter_model.safetensors") for e in exact.experts}
    scale = CONFIG.lora_alpha / CONFIG.rank
    name = next(n for n in merged if n.endswith("q_proj.lora_A.weight")).removesuffix(".lora_A.weight")
    dense = sum(
        e.weight * scale * parts[e.expert][f"{name}.lora_B.weight"] @ parts[e.expert][f"{name}.lora_A.weight"]
        for e in exact.experts
    )
    torch.testing.assert_close(merged[f"{name}.lora_B.weight"] @ merged[f"{name}.lora_A.weight"], dense)
    cut = experts.merge(query, MergeOptions(beta=0.5, threshold=0.0, rank=CONFIG.rank))
    assert cut.rank == CONFIG.rank and 0 < cut.relative_error < 1


def test_training_starts_from_a_merged_adapter(expert_index, tiny):
    """A slot loaded with a merge (rank at most the slot's) holds exactly the merge's delta."""
    from adapters.batched_step import BatchedStep

    experts = ExpertSet.load(expert_index, tiny)
    merged = experts.merge(experts.keys[0], MergeOptions(beta=0.5, threshold=0.0, rank=CONFIG.rank)).adapter
    step = BatchedStep(tiny, CONFIG.model_copy(update={"max_batch": 2}))
    step.reset(1, seed=0, learning_rate=1e-3, initial=merged)
    mine = step.export(1).tensors()
    target = merged.tensors()
    for name in (n for n in target if ".lora_A." in n):
        b_name = name.replace("lora_A", "lora_B")
        torch.testing.assert_close(
            step.bank.scaling * mine[b_name][:, : target[name].shape[0]] @ mine[name][: target[name].shape[0]],
            merged.scaling * target[b_name] @ target[name],
        )
    with pytest.raises(ValueError, match="does not adapt"):
        foreign = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32)}
        step.bank.load(0, foreign, 1.0)  # layer 0 is below the upper half


def test_the_cli_builds_experts(small_index, tiny, tmp_path, monkeypatch):
    from serving.cli import app

    directory = tmp_path / "idx"
    shutil.copytree(small_index.directory, directory)
    monkeypatch.setenv("SIFT_SERVE_MODELS__BASE_MODEL", str(tiny))
    args = ["experts", "build", str(directory), "--experts", "2", "--steps", "1"]
    result = CliRunner().invoke(app, [*args, "--batch", "2"])
    assert result.exit_code == 0, result.output
    assert f"{directory / EXPERTS_DIR}" in result.output and ExpertManifest.read(directory / EXPERTS_DIR).sizes
    refused = CliRunner().invoke(app, ["experts", "build", str(directory), "--experts", "3", "--steps", "1"])
    assert refused.exit_code == 1 and "--overwrite" in refused.output
    assert CliRunner().invoke(app, ["experts", "build"]).exit_code == 1


@pytest.fixture(scope="module")
def merge_server(expert_index, tiny, tmp_path_factory):
    adapters = str(tmp_path_factory.mktemp("adapters"))
    settings = tiny_app_settings(
        tiny,
        expert_index,
        adaptation={
            "candidates": 20,
            "max_steps": 2,
            "max_train_tokens": 32,
            "merge_beta": 0.5,
            "merge_experts": 3,
            "merge_rank": 32,
        },
        generator={"max_model_len": 256, "default_max_tokens": 4, "adapter_dir": adapters},
        server={"limits": {"merge_experts": 3}},
    )
    return local_server(settings)


@pytest.fixture()
async def merge_client(merge_server):
    async with in_process_client(merge_server) as c:
        yield c


async def test_merge_answers_with_the_weighted_experts(merge_client, merge_server):
    extra = {"adaptation": {"mode": "merge", "merge_threshold": 0.0}}
    done = await merge_client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body=extra)
    report = done.model_extra["adaptation"]
    assert report["mode"] == "merge" and report["steps"] == 0 and report["adapter"] is True
    experts = report["merge"]["experts"]
    assert len(experts) == 3 and sum(e["weight"] for e in experts) == pytest.approx(1.0)  # capped at 3
    assert report["merge"]["rank"] == 3 * CONFIG.rank and report["merge"]["relative_error"] == 0.0
    assert report["documents"] == [] and report["timings"]["merge"] > 0
    assert list(merge_server.settings.generator.adapter_dir.iterdir()) == []


async def test_merge_and_train_starts_training_from_the_merge(merge_client, merge_server):
    extra = {"adaptation": {"mode": "merge+train", "gain_budget": None, "merge_threshold": 0.0}}
    done = await merge_client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body=extra)
    report = done.model_extra["adaptation"]
    assert report["mode"] == "merge+train" and report["steps"] == 2 and report["adapter"] is True
    assert report["merge"]["rank"] == CONFIG.rank and len(report["documents"]) == 2
    stream = await merge_client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        extra_body={"adaptation": {**extra["adaptation"], "progress": True}},
    )
    stages = [
        c.model_extra["adaptation"]["stage"]
        async for c in stream
        if "stage" in (c.model_extra or {}).get("adaptation", {})
    ]
    assert stages == ["merged", "selected", "training", "training"]


async def test_merge_limits_and_a_server_without_experts(merge_client, tiny, small_index, tmp_path_factory):
    with pytest.raises(openai.BadRequestError, match="server.limits.merge_experts"):
        await merge_client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_body={"adaptation": {"mode": "merge", "merge_experts": 4}}
        )
    adapters = str(tmp_path_factory.mktemp("adapters"))
    plain = local_server(tiny_app_settings(tiny, small_index.directory, generator={"adapter_dir": adapters}))
    transport = httpx.ASGITransport(app=create_app(plain))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as raw:
        body = {"model": MODEL, "messages": MESSAGES, "adaptation": {"mode": "merge"}}
        answer = await raw.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "no_experts" and "sift-serve experts build" in error["message"]
    assert str(small_index.directory) not in error["message"]
