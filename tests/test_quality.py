"""The quality protocol end to end on a tiny random model and a real small index (every phase runs and
summarises into the documented shape), the statistics it reports, and its adaptive-steps arithmetic
against the product's stopping rule."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from benchmarks.quality.config import Config
from benchmarks.quality.plots import plots
from benchmarks.quality.prompts import load_prompts
from benchmarks.quality.protocol import run_protocol
from benchmarks.quality.records import Label, Results, Run, Score
from benchmarks.quality.report import markdown
from benchmarks.quality.statistics import adaptive_steps, summarise
from benchmarks.stats import paired, spearman
from selection.rules import Method
from selection.selector import SelectOptions, Selector
from tests.conftest import SMALL_CORPUS_FILES, STDLIB, tiny_llama_dir

CONFIG = Config(
    prompt_tokens=24,
    eval_tokens=24,
    train_tokens=32,
    max_steps=4,
    checkpoints=(1, 2, 4),
    prompts_per_domain=2,
    dev_prompts_per_domain=2,
    sweep_prompts=1,
    learning_rates=(1e-3, 1e-2),
    duplicate_prompts_per_domain=1,
    random_prompts_per_domain=1,
    seed_prompts_per_domain=1,
    candidates=30,
    min_gain_grid=(0.01, 0.1, 1.0, 10.0),
    context_tokens=300,
)


def _write(path, names: list[tuple[str, str]]) -> None:
    path.write_text(
        "".join(
            json.dumps(
                {"id": f"{d}/{n}", "text": (STDLIB / n).read_text()[:3000], "domain": d, "source": n, "family": n}
            )
            + "\n"
            for d, n in names
        )
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, small_corpus):
    root = tmp_path_factory.mktemp("quality-corpus")
    _write(root / "train.jsonl", [("code", name) for name in SMALL_CORPUS_FILES])
    _write(root / "dev.jsonl", [("code", "queue.py"), ("docs", "textwrap.py")])
    _write(root / "heldout.jsonl", [("code", "sched.py"), ("code", "colorsys.py"), ("docs", "pprint.py")])
    return root


def test_protocol_runs_every_phase_and_summarises(tmp_path_factory, corpus, small_index, tmp_path):
    tiny = tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "llama")
    index_dir = tmp_path_factory.mktemp("idx-copy") / "index"
    index_dir.symlink_to(small_index.directory, target_is_directory=True)
    args = argparse.Namespace(model=str(tiny), index=index_dir, corpus=corpus, device="cpu")
    results = Results()
    run_protocol(results, CONFIG, args, save=lambda: None)
    assert Results.model_validate_json(results.model_dump_json()) == results  # the file round-trips

    assert results.contamination["shared_13grams"] == 0 and results.contamination["prompts"] == 3
    assert set(results.learning_rates) == {"sift", "nn"}
    assert results.calibration["min_gain"] in CONFIG.min_gain_grid and results.calibration["n"] == 2
    check = results.prefix_check
    assert check["abs_diff"] < 1e-5 and check.get("same_picks", True)  # training is deterministic per prefix
    for entry in results.reported.values():
        sift, adaptive = entry[Method.SIFT], entry[Label.ADAPTIVE]
        assert set(sift.curve) == {str(s) for s in range(CONFIG.max_steps + 1)}
        assert adaptive.final == sift.curve[str(adaptive.steps)]
        assert sift.final.doc_bpb is not None and len(sift.sigma2) == CONFIG.max_steps + 1
    for entry in results.reported.values():
        for label in (Label.ICL_NN, Label.ICL_SIFT, Label.SIFT_ICL):
            final = entry[label].final
            assert 0 < final.context_tokens <= 300 and final.context_documents >= 1
            assert final.bytes == entry[Label.BASE].final.bytes  # the same bytes are scored
        assert entry[Label.SIFT_ICL].steps == CONFIG.max_steps and entry[Label.SIFT_ICL].train_seconds > 0
    for entry in results.duplicates.values():
        # a third of the chunks three times: NN repeats texts, NN-F never does
        assert entry[Method.NN_F].distinct_texts == len(entry[Method.NN_F].documents)
        assert entry[Method.NN].distinct_texts <= entry[Method.NN_F].distinct_texts

    summary = summarise(results, CONFIG)
    assert summary["n_prompts"] == 3 and set(summary["per_domain"]) == {"code", "docs"}
    assert {"base", "nn", "nn_f", "sift", "adaptive", "random", "icl_nn", "icl_sift", "sift_icl"} == set(
        summary["overall"]
    )
    assert summary["n"]["sift"] == 3 and summary["n"]["random"] == 2
    assert set(summary["cost"]["sift_icl"]) == {
        "steps",
        "train_seconds",
        "context_tokens",
        "scoring_seconds",
        "seconds",
    }
    assert summary["cost"]["base"]["train_seconds"] == 0 < summary["cost"]["sift"]["train_seconds"]
    assert "sift_vs_icl_nn" in summary["tests"] and summary["unseen_domain"]["tests"] == {}
    assert all(math.isfinite(v) and v > 0 for v in summary["overall"].values())
    assert summary["steps"]["base"] == 0 and summary["steps"]["sift"] == CONFIG.max_steps
    t = summary["tests"]["sift_vs_nn"]
    assert t["n"] == 3 and t["ci_low"] <= t["mean_diff"] <= t["ci_high"] and 0 <= t["p_value"] <= 1
    assert set(summary["duplicates"]["overall"]) == {"nn", "nn_f", "sift"} and summary["duplicates"]["n"] == 2
    avu = summary["adaptive_vs_uniform"]
    assert {"adaptive", "uniform", "steps", "test"} <= set(avu) and 0 <= avu["steps"] <= CONFIG.max_steps
    assert "| **overall** |" in markdown(summary)
    plots(results, summary, CONFIG, tmp_path, "test")
    assert {p.name for p in tmp_path.iterdir()} == {
        "quality-test-curves.png",
        "quality-test-duplicates.png",
        "quality-test-adaptive.png",
        "quality-test-compute.png",
    }


def test_prompts_take_one_document_per_family(tmp_path, tokenizer):
    path = tmp_path / "heldout.jsonl"
    docs = [("a", "f1", "glob.py"), ("b", "f1", "csv.py"), ("c", "f2", "shlex.py"), ("d", "f3", "heapq.py")]
    path.write_text(
        "".join(
            json.dumps({"id": i, "text": (STDLIB / n).read_text(), "domain": "code", "source": n, "family": f}) + "\n"
            for i, f, n in docs
        )
    )
    prompts = load_prompts(path, tokenizer, 64, per_domain=5)
    assert len(prompts) == 3 and len({p.family for p in prompts}) == 3
    assert all(len(p.ids) == 64 for p in prompts)
    assert load_prompts(path, tokenizer, 64, per_domain=5) == prompts  # stable


@pytest.mark.parametrize("min_gain", [0.0, 0.05, 0.5, 2.0, 20.0])
def test_adaptive_steps_match_the_product_rule(small_index, minilm, min_gain):
    selector = Selector(small_index, minilm)
    prompt = "split a shell command line into tokens, respecting quotes"
    full = selector.select([prompt], SelectOptions(12, candidates=40))[0]
    adaptive = selector.select([prompt], SelectOptions(12, candidates=40, min_gain=min_gain, step_tokens=128))[0]
    steps = adaptive_steps(full.sigma2, min_gain, 128, 12)
    assert len(adaptive.documents) == steps
    assert [d.id for d in adaptive.documents] == [d.id for d in full.documents][:steps]
    assert adaptive.stop_reason == ("max_steps" if steps == 12 else "min_gain")


def test_interpolated_steps_mix_the_neighbouring_counts():
    curve = {str(n): Score(bpb=bpb, bits=bpb, bytes=1) for n, bpb in enumerate((1.0, 0.8, 0.7))}
    run = Run(steps=2, curve=curve, final=curve["2"])
    assert run.at(1) == 0.8 and run.at(1.25) == pytest.approx(0.775)


def test_paired_statistics():
    better = paired([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.5, 2.6, 3.7, 4.8, 5.9, 7.0])
    assert better.n == 6 and better.a_better == 6 and better.b_better == 0
    assert better.p_value == pytest.approx(2 / 64)  # exact: both all-negative and all-positive sign patterns
    assert better.ci_high < 0 and better.ci_low <= better.mean_diff <= better.ci_high
    same = paired([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same.p_value == 1.0 and same.mean_diff == 0 == same.ci_low == same.ci_high
    mixed = paired([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.1, 1.9, 3.1, 3.9, 5.1, 5.9])
    assert mixed.ci_low < 0 < mixed.ci_high and mixed.p_value > 0.5
    rho = spearman([1, 2, 3, 4, 5, 6, 7, 8], [2, 1, 4, 3, 6, 5, 8, 7])
    assert 0.8 < rho["rho"] < 1 and rho["ci_low"] <= rho["rho"] <= rho["ci_high"] and rho["n"] == 8
