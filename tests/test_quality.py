"""The quality protocol's pieces on a tiny random model and a real small index: every method runs, is
scored at its checkpoints, and summarises into the documented shape."""

from __future__ import annotations

import json
import math

import pytest

from adapters.config import TrainerConfig
from adapters.trainer import Trainer
from benchmarks.quality import Config, Evaluator, Method, markdown, plots, prompts, summarise
from selection.selector import Selector
from tests.conftest import STDLIB, tiny_llama_dir

CONFIG = Config(
    prompt_tokens=24,
    eval_tokens=24,
    train_tokens=32,
    max_steps=3,
    checkpoints=(1, 2),
    prompts_per_domain=2,
    sweep_prompts=1,
    learning_rates=(1e-3,),
    candidates=20,
)
METHODS = [Method("base", None), Method("nn", "nn"), Method("sift", "sift"), Method("adaptive_sift", "sift", alpha=5.0)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_index, minilm):
    tiny = tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "llama")
    trainer = Trainer(
        tiny,
        TrainerConfig(max_steps=3, max_train_tokens=32, time_budget_s=None),
    )
    heldout = tmp_path_factory.mktemp("corpus") / "heldout.jsonl"
    docs = [("code", "shlex.py"), ("code", "glob.py"), ("code", "heapq.py"), ("docs", "fnmatch.py")]
    heldout.write_text(
        "".join(
            json.dumps(
                {"id": f"{d}/{n}", "text": (STDLIB / n).read_text()[:4000], "domain": d, "source": n, "family": n}
            )
            + "\n"
            for d, n in docs
        )
    )
    return Evaluator(trainer, Selector(small_index, minilm), trainer.tokenizer, CONFIG), heldout


def test_prompts_are_split_between_report_and_sweep(setup):
    evaluator, heldout = setup
    reported, sweep = prompts(heldout, evaluator.tokenizer, CONFIG)
    assert [p["domain"] for p in reported].count("code") == 2 and len(sweep) == 1
    assert {p["id"] for p in reported}.isdisjoint({p["id"] for p in sweep})
    assert all(len(p["ids"]) == 48 for p in reported)


def test_methods_run_and_summarise(setup, tmp_path):
    evaluator, heldout = setup
    reported, _ = prompts(heldout, evaluator.tokenizer, CONFIG)
    results = {"methods": [m.name for m in METHODS], "prompts": {}}
    for prompt in reported:
        entry = results["prompts"].setdefault(prompt["id"], {"domain": prompt["domain"], "methods": {}})
        for method in METHODS:
            entry["methods"][method.name] = evaluator.run(prompt, method, 1e-3, seed=0)
    sample = results["prompts"][reported[0]["id"]]["methods"]
    assert sample["base"]["steps"] == 0 and sample["sift"]["steps"] == 3
    assert set(sample["sift"]["curve"]) == {"0", "1", "2"} and len(sample["sift"]["sigma2"]) == 4
    assert sample["adaptive_sift"]["steps"] < 3  # alpha = 5 stops early on these prompts
    assert sample["sift"]["curve"]["0"] == sample["base"]["final"]
    summary = summarise(results, results["methods"])
    assert set(summary["overall"]) == {"base", "nn", "sift", "adaptive_sift"} and set(summary["per_domain"]) == {
        "code",
        "docs",
    }
    assert all(math.isfinite(v) and v > 0 for v in summary["overall"].values())
    assert summary["steps"]["base"] == 0 and summary["steps"]["sift"] == 3
    assert "| **overall** |" in markdown(summary, results["methods"])
    extra = plots(results, CONFIG, tmp_path, "test")
    assert {p.name for p in tmp_path.iterdir()} == {
        "quality-test-curves.png",
        "quality-test-gain-vs-sigma2.png",
        "quality-test-compute.png",
    }
    assert "sigma2_gain_correlation" in extra
