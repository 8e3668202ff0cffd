"""The quality protocol end to end on a tiny random model and a real small index (every phase runs and
summarises into the documented shape), the statistics it reports (clustered tests, Holm), and the
stopping rules' arithmetic against the product's selector."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from adapters.config import LayerScope
from benchmarks.quality.config import Config, Search
from benchmarks.quality.plots import plots
from benchmarks.quality.prompts import load_prompts
from benchmarks.quality.protocol import run_protocol
from benchmarks.quality.records import Label, Results, Run, Score
from benchmarks.quality.report import markdown
from benchmarks.quality.statistics import PREREGISTRATION, summarise
from benchmarks.stats import clustered, holm, paired, spearman
from selection.rules import Method
from selection.selector import SelectOptions, Selector
from selection.stopping import budget_steps
from tests.conftest import SMALL_CORPUS_FILES, STDLIB, tiny_llama_dir

CONFIG = Config(
    prompt_tokens=24,
    eval_tokens=24,
    max_steps=4,
    checkpoints=(2, 4),
    new_prompts_per_source=2,
    contrast_prompts_per_domain=1,
    dev_prompts=2,
    learning_rates=(1e-3, 1e-2),
    lr_widen=1,
    search=Search(layers=(LayerScope.ALL, LayerScope.UPPER_HALF), ranks=(4,), train_tokens=(128,), steps=2),
    candidates=30,
    tau_grid=(0.01, 0.1, 1.0),
    context_tokens=300,
    model_context=512,
    full_context_picks=8,
    bootstrap=200,
)
GROUPS = {"alpha": "new_knowledge", "beta": "new_knowledge", "code": "contrast", "docs": "contrast"}


def _write(path, names: list[tuple[str, str]]) -> None:
    path.write_text(
        "".join(
            json.dumps(
                {"id": f"{d}/{n}", "text": (STDLIB / n).read_text()[:3000], "domain": d, "source": d, "family": n}
            )
            + "\n"
            for d, n in names
        )
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, small_corpus):
    root = tmp_path_factory.mktemp("quality-corpus")
    _write(root / "train.jsonl", [("code", name) for name in SMALL_CORPUS_FILES])
    _write(root / "dev.jsonl", [("alpha", "queue.py"), ("beta", "textwrap.py")])
    _write(
        root / "heldout.jsonl",
        [
            ("alpha", "sched.py"),
            ("alpha", "colorsys.py"),
            ("beta", "pprint.py"),
            ("code", "token.py"),
            ("docs", "calendar.py"),
        ],
    )
    (root / "manifest.json").write_text(json.dumps({"domains": {d: {"group": g} for d, g in GROUPS.items()}}))
    return root


def test_protocol_runs_every_phase_and_summarises(tmp_path_factory, corpus, small_index, tmp_path):
    tiny = tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "llama")
    args = argparse.Namespace(model=str(tiny), index=[small_index.directory], corpus=corpus, device="cpu")
    results = Results()
    saves = []
    run_protocol(results, CONFIG, args, save=lambda: saves.append(1))
    assert Results.model_validate_json(results.model_dump_json()) == results  # the file round-trips
    assert results.preregistration == PREREGISTRATION and len(saves) > 20  # saved run by run

    assert results.contamination["shared_13grams"] == 0 and results.contamination["prompts"] == 7
    assert set(results.search) == {"alpha/queue.py", "beta/textwrap.py"}
    assert set(results.recipe["table"]) == {"all/r4/128t", "upper_half/r4/128t"}
    assert results.recipe["chosen"]["layers"] in ("all", "upper_half")
    for method in ("sift", "nn"):
        lr = results.lr[method]
        assert lr["best"] in lr["grid"] and len(lr["grid"]) in (2, 3)  # widened once at most
        assert lr["interior"] == (lr["grid"][0] < lr["best"] < lr["grid"][-1])
    assert results.lr["shared"] in results.lr["sift"]["grid"] and results.lr["shared"] in results.lr["nn"]["grid"]
    assert results.stopping["tau"] in CONFIG.tau_grid and results.stopping["n"] == 2
    new = [e for e in results.reported.values() if e.domain in ("alpha", "beta")]
    assert len(new) == 3 and len(results.reported) == 5
    for entry in new:
        sift = entry[Method.SIFT]
        assert set(sift.curve) == {"0", "2", "4"} and len(sift.sigma2) == CONFIG.max_steps + 1
        assert sift.final.content_bytes <= sift.final.bytes and sift.final.content_bpb > 0
        for label in (Label.ICL_SIFT, Label.ICL_EQUAL_DOCS, Label.ICL_FULL):
            final = entry[label].final
            assert final.context_documents >= 1 and final.bytes == entry[Label.BASE].final.bytes
        assert entry[Label.ICL_SIFT].final.context_tokens <= 300
        assert entry[Label.ICL_EQUAL_DOCS].final.context_documents <= CONFIG.max_steps
        assert {Label.NN_SHARED, Label.SIFT_SHARED} <= set(entry.runs)

    summary = summarise(results, CONFIG)
    nk = summary["new_knowledge"]
    assert nk["n"] == 3 and nk["sources"] == ["alpha", "beta"]
    for key in ("trained_vs_base", "trained_vs_icl_equal_docs", "sift_vs_nn_shared_lr"):
        row = nk[key]
        assert row["ci"][0] <= row["mean"] <= row["ci"][1] and 0 < row["p"] <= 1 and row["clusters"] == 2
        assert row["p_holm"] >= row["p"]
    assert set(summary["stopping"]) >= {"adaptive_vs_uniform", "spearman_steps_gain", "tau"}
    assert summary["lr"]["sift"]["best"] == results.lr["sift"]["best"]
    assert summary["contrast"]["n"] == 2 and summary["contrast"]["trained_vs_base"] is not None
    assert all(math.isfinite(v) for row in nk["per_source"].values() for v in row.values())
    assert "primary: trained_vs_base" in markdown(summary)
    plots(results, summary, CONFIG, tmp_path, "test")
    assert {p.name for p in tmp_path.iterdir()} == {
        "quality-test-curves.png",
        "quality-test-pareto.png",
        "quality-test-lr.png",
        "quality-test-stopping.png",
    }

    resumed = Results.model_validate_json(results.model_dump_json())
    run_protocol(resumed, CONFIG, args, save=lambda: None)  # everything is there: nothing is trained again
    assert resumed == results


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


@pytest.mark.parametrize("tau", [0.0, 0.02, 0.2, 2.0, 50.0])
def test_the_gain_budget_rule_keeps_a_prefix_of_the_picks(small_index, minilm, tau):
    selector = Selector(small_index, minilm)
    prompt = "split a shell command line into tokens, respecting quotes"
    full = selector.select([prompt], SelectOptions(12, candidates=40))[0]
    kept = selector.select([prompt], SelectOptions(12, candidates=40, gain_budget=tau))[0]
    steps = budget_steps(full.sigma2, tau, 12)
    assert len(kept.documents) == steps and kept.sigma2 == full.sigma2[: steps + 1]
    assert [d.id for d in kept.documents] == [d.id for d in full.documents][:steps]
    assert kept.stop_reason == ("max_steps" if steps == 12 else "gain_budget")


def test_gain_budget_grants_more_steps_to_prompts_their_picks_explain_better():
    # V = 1 - sigma2_K / sigma2_0; steps = floor(1 / (exp(tau / V) - 1)), capped at K
    assert budget_steps([1.0, 0.5, 0.4, 0.3, 0.2], 0.1, 4) == 4  # V = 0.8: 1/(e^0.125 - 1) = 7.5
    assert budget_steps([1.0, 0.9, 0.85, 0.82, 0.8], 0.1, 4) == 1  # V = 0.2: 1/(e^0.5 - 1) = 1.54
    assert budget_steps([1.0, 0.9, 0.85, 0.82, 0.8], 0.5, 4) == 0
    assert budget_steps([1.0], 0.1, 4) == 0 and budget_steps([1.0, 1.0], 0.1, 4) == 0
    assert budget_steps([1.0, 0.5], 0.0, 4) == 1


def test_interpolated_steps_mix_the_neighbouring_checkpoints():
    curve = {str(n): Score(bpb=bpb, bits=bpb, bytes=1) for n, bpb in ((0, 1.0), (4, 0.8), (8, 0.7))}
    run = Run(steps=8, curve=curve, final=curve["8"])
    assert run.at(4) == 0.8 and run.at(2) == pytest.approx(0.9) and run.at(6) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="outside"):
        run.at(9)


def test_clustered_statistics():
    rng = np.random.default_rng(1)
    clusters = [c for c in "abcdef" for _ in range(5)]
    better = clustered(list(-0.02 + 0.005 * rng.standard_normal(30)), clusters)
    assert better.clusters == 6 and better.n == 30 and better.ci[1] < 0 < -better.mean
    assert better.p == pytest.approx(2 / 64)  # exact sign flips over six sources: only all-negative and all-positive
    assert better.loso_same_sign and better.loso_min <= better.mean <= better.loso_max and better.mde > 0
    one_source = [-0.1] * 5 + [0.0] * 25  # one source carries the effect
    carried = clustered(one_source, clusters)
    assert carried.p > 0.3 and carried.loso_max == 0.0 and not carried.loso_same_sign
    with pytest.raises(ValueError, match="two clusters"):
        clustered([0.1, 0.2], ["a", "a"])
    assert holm({"x": 0.01, "y": 0.04, "z": 0.03}) == pytest.approx({"x": 0.03, "y": 0.06, "z": 0.06})


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
