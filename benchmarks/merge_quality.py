"""Quality of expert merging on the quality benchmark's new-knowledge prompts: `merge` and `merge+train`
beside the base model, SIFT training and in-context retrieval, for several expert counts E.

For each E, experts are built once over the quality index (`adapters.expert_build`, timed; resumable) in a
view of the index (`<index>-experts-E/`: links to the index files, the experts beside them). Then, for
every held-out new-knowledge prompt of the quality run (the same prompts, the same candidates, the same
statistics: `benchmarks.stats.clustered`, by source):

- `merge`: the experts weighed by the prompt (`adaptation.merge_*` defaults), merged at the served rank
  (`merge_rank`), scored;
- `merge@r8`: the same merge cut to the trainer's rank: where `merge+train` starts;
- `merge+train`: SIFT's first `steps/2` picks trained from `merge@r8` (the quality run's recipe and rate).

The base model, SIFT training at 8 and 16 steps, and in-context retrieval come from the quality run's
results file (the same model, prompts and seed); the base model is rescored on the first prompts and the
run stops if the scores disagree (a stale results file).

Targets: `merge` keeps >= 50% of 16-step training's gain over the base model; `merge+train` with half the
steps is at least as good as training with all of them.

    python -m benchmarks.merge_quality --corpus ~/.cache/sift-serve/quality-corpus \\
        --index ~/.cache/sift-serve/quality-corpus/index-256 --experts 16 64 --steps 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from adapters.config import LayerScope, TrainerConfig
from adapters.expert_build import build_experts, plan_for
from adapters.experts import ExpertSet, experts_dir
from adapters.merge import MergeOptions
from benchmarks.quality.config import CONFIGS, Recipe
from benchmarks.quality.evaluation import Evaluator
from benchmarks.quality.protocol import prompt_sets
from benchmarks.quality.records import Label, Results, Run
from benchmarks.stats import clustered, holm
from infra.config import default_cache_dir
from infra.models import resolve_model
from selection.embed import load_embedder
from selection.index import CorpusIndex
from selection.manifest import IndexManifest
from selection.rules import Method
from selection.selector import Selector
from serving.config import AdaptationConfig

log = logging.getLogger(__name__)

INDEX_FILES = ("manifest.json", "embeddings.npy", "index.faiss", "docs.sqlite")
TRAIN_STEPS = 16
"""The training the targets compare with: 16 steps (merge+train gets half)."""


def index_view(index: Path, experts: int) -> Path:
    """A directory that is the index (its files linked) with room for its own experts."""
    view = index.with_name(f"{index.name}-experts-{experts}")
    view.mkdir(exist_ok=True)
    for name in INDEX_FILES:
        link = view / name
        if not link.exists():
            link.symlink_to(index.resolve() / name)
    return view


def build(index: Path, model: Path, experts: int, steps: int, results: dict) -> Path:
    """E experts over `index`, timed when built from scratch (a finished build is only checked)."""
    view = index_view(index, experts)
    trainer = TrainerConfig()
    tokens = IndexManifest.read(index).chunk_tokens  # one chunk per step
    plan = plan_for(trainer, experts, steps, AdaptationConfig().learning_rate, tokens)
    fresh = not (experts_dir(view) / "manifest.json").is_file()
    started = time.monotonic()
    build_experts(view, model, trainer, plan)
    if fresh:
        seconds = time.monotonic() - started
        record = {"seconds": seconds, "plan": plan.model_dump(), "batch": trainer.max_batch}
        results.setdefault("builds", {})[str(experts)] = record
    return view


def evaluate(args: argparse.Namespace, results: dict, quality: Results, save) -> None:
    config = CONFIGS["cpu"]
    model = resolve_model("default", default_cache_dir())
    evaluator = Evaluator(model, config)
    _, prompts, _ = prompt_sets(args, config, evaluator.tokenizer)
    embedder = load_embedder("minilm", None)
    selector = Selector(CorpusIndex.load(args.index, embedder), embedder)
    recipe = Recipe.of(quality.recipe["chosen"])  # type: ignore[index]
    served = Recipe(LayerScope(recipe.layers), AdaptationConfig().merge_rank, recipe.train_tokens)
    rate = quality.lr["sift"]["best"]  # type: ignore[index]
    defaults = AdaptationConfig()
    options = MergeOptions(defaults.merge_beta, defaults.merge_threshold, defaults.merge_experts, defaults.merge_rank)
    rows = results.setdefault("prompts", {})
    _check_records(evaluator, prompts[:2], quality)
    for experts in args.experts:
        expert_set = ExpertSet.load(index_view(args.index, experts), model)
        for phase, shape in (("served", served), ("trainer", recipe)):
            bar = tqdm(prompts, desc=f"E={experts}: {phase}", unit="prompt")
            for prompt in bar:
                row = rows.setdefault(prompt.id, {"domain": prompt.domain})
                key = f"{experts}/{phase}"
                if key in row:
                    continue
                text = evaluator.tokenizer.decode(prompt.ids[: config.prompt_tokens])
                started = time.monotonic()
                cut = options if phase == "served" else dataclasses.replace(options, rank=recipe.rank)
                merged = expert_set.merge(embedder.embed([text])[0], cut)
                merge_seconds = time.monotonic() - started
                entry: dict = {
                    "experts": [[e.expert, e.weight] for e in merged.experts],
                    "rank": merged.rank,
                    "relative_error": merged.relative_error,
                    "merge_seconds": merge_seconds,
                }
                if merged.adapter is None:
                    entry["score"] = quality.reported[prompt.id][Label.BASE].final.model_dump()
                else:
                    entry["score"] = evaluator.adapter(prompt, merged.adapter, shape).model_dump()
                if phase == "trainer":
                    start = Run.model_validate({"steps": 0, "final": entry["score"], "curve": {"0": entry["score"]}})
                    half = TRAIN_STEPS // 2
                    run = evaluator.run(
                        prompt, selector, Method.SIFT, rate, [half], start, recipe, steps=half, initial=merged.adapter
                    )
                    entry["train"] = {"score": run.final.model_dump(), "steps": run.steps, "seconds": run.seconds}
                row[key] = entry
                save()


def _check_records(evaluator: Evaluator, prompts, quality: Results) -> None:
    """The quality run's base scores reproduce here (else its records are stale)."""
    for prompt in prompts:
        mine = evaluator.base(prompt).final.bpb
        theirs = quality.reported[prompt.id][Label.BASE].final.bpb
        if abs(mine - theirs) > 1e-4 * theirs:
            raise SystemExit(f"{prompt.id}: base bpb {mine:.5f} here, {theirs:.5f} in the quality results: rerun it")


def summarise(results: dict, quality: Results, experts: list[int]) -> dict:
    """Per E: every condition's mean bpb, the comparisons behind the targets, costs."""
    rows = results["prompts"]
    ids = [i for i in rows if all(f"{e}/trainer" in rows[i] and f"{e}/served" in rows[i] for e in experts)]
    sources = [rows[i]["domain"] for i in ids]
    reported = {i: quality.reported[i] for i in ids}

    def reference(label: str, step: float | None = None) -> np.ndarray:
        runs = [reported[i][label] for i in ids]
        return np.array([r.at(step) if step is not None else r.final.bpb for r in runs])

    base = reference(Label.BASE)
    train16, train8 = reference(Method.SIFT, TRAIN_STEPS), reference(Method.SIFT, TRAIN_STEPS // 2)
    step_seconds = np.mean([reported[i][Method.SIFT].seconds / reported[i][Method.SIFT].steps for i in ids])

    def prefill(label: str) -> float:
        """Seconds the documents in context add to scoring the prompt (the extra prefill)."""
        return float(np.mean([reported[i][label].final.seconds - reported[i][Label.BASE].final.seconds for i in ids]))

    out: dict = {
        "n": len(ids),
        "sources": len(set(sources)),
        "base": float(base.mean()),
        "train_16": float(train16.mean()),
        "train_8": float(train8.mean()),
        "icl_sift_520": float(reference(Label.ICL_SIFT).mean()),
        "icl_equal_docs_32": float(reference(Label.ICL_EQUAL_DOCS).mean()),
        "train_16_gain": float((base - train16).mean()),
        "compute_seconds": {
            "train_16": float(TRAIN_STEPS * step_seconds),
            "train_8": float(TRAIN_STEPS // 2 * step_seconds),
            "icl_sift_520": prefill(Label.ICL_SIFT),
            "icl_equal_docs_32": prefill(Label.ICL_EQUAL_DOCS),
        },
        "by_experts": {},
    }
    p_values = {}
    for e in experts:
        merge = np.array([rows[i][f"{e}/served"]["score"]["bpb"] for i in ids])
        start = np.array([rows[i][f"{e}/trainer"]["score"]["bpb"] for i in ids])
        mt = np.array([rows[i][f"{e}/trainer"]["train"]["score"]["bpb"] for i in ids])
        keep = (base - merge) - 0.5 * (base - train16)  # >= 0: the merge keeps half of training's gain
        versus = mt - train16  # <= 0: merge+train at half the steps is at least as good
        comparisons = {
            "merge_vs_base": clustered(merge - base, sources),
            "merge_keeps_half_of_train16": clustered(-keep, sources),
            "merge_train8_vs_train16": clustered(versus, sources),
            "merge_train8_vs_train8": clustered(mt - train8, sources),
        }
        p_values |= {f"{e}/{k}": c.p for k, c in comparisons.items()}
        served = [rows[i][f"{e}/served"] for i in ids]
        out["by_experts"][str(e)] = {
            "merge": float(merge.mean()),
            "merge_r8": float(start.mean()),
            "merge_train_8": float(mt.mean()),
            "merge_gain": float((base - merge).mean()),
            "merge_share_of_train16_gain": float((base - merge).mean() / (base - train16).mean()),
            "comparisons": {k: dataclasses.asdict(c) for k, c in comparisons.items()},
            "experts_per_prompt": float(np.mean([len(s["experts"]) for s in served])),
            "top_weight": float(np.mean([s["experts"][0][1] if s["experts"] else 0.0 for s in served])),
            "relative_error": float(np.mean([s["relative_error"] for s in served])),
            "merge_seconds": float(np.mean([s["merge_seconds"] for s in served])),
            "merge_train_seconds": float(np.mean([rows[i][f"{e}/trainer"]["train"]["seconds"] for i in ids])),
            "targets": {
                "merge_keeps_half_of_train16_gain": bool(keep.mean() >= 0),
                "merge_train_half_steps_at_least_train16": bool(versus.mean() <= 0),
            },
            "build": results.get("builds", {}).get(str(e)),
        }
    adjusted = holm(p_values)
    for e in experts:
        for name, comparison in out["by_experts"][str(e)]["comparisons"].items():
            comparison["p_holm"] = adjusted[f"{e}/{name}"]
    return out


def plot(summary: dict, path: Path) -> None:
    """Quality against test-time compute, the modes as points (mean bpb of the new-knowledge prompts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compute = summary["compute_seconds"]
    points = [
        ("base", 0.0, summary["base"]),
        ("train, 8 steps", compute["train_8"], summary["train_8"]),
        ("train, 16 steps", compute["train_16"], summary["train_16"]),
        ("in context, 520 tokens", compute["icl_sift_520"], summary["icl_sift_520"]),
        ("in context, 32 docs", compute["icl_equal_docs_32"], summary["icl_equal_docs_32"]),
    ]
    for e, row in summary["by_experts"].items():
        points.append((f"merge, E={e}", row["merge_seconds"], row["merge"]))
        points.append(
            (f"merge+train 8, E={e}", row["merge_seconds"] + row["merge_train_seconds"], row["merge_train_8"])
        )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, x, y in points:
        marker = "s" if label.startswith("merge") else ("^" if label.startswith("in context") else "o")
        ax.scatter(max(x, 0.01), y, marker=marker, s=40)
        ax.annotate(label, (max(x, 0.01), y), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("test-time compute before answering, seconds per prompt (log; this CPU)")
    ax.set_ylabel("bits per byte of the continuation (lower is better)")
    ax.set_title(f"Adaptation modes on {summary['n']} new-knowledge prompts ({summary['sources']} sources)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--index", type=Path, required=True, help="the quality index the experts cluster")
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--steps", type=int, default=16, help="training steps per expert")
    parser.add_argument("--quality", type=Path, default=Path("benchmarks/results/quality-cpu.json"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/merge-quality-cpu.json"))
    parser.add_argument("--summarise", action="store_true", help="only redo the summary and plot of --out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quality = Results.model_validate_json(args.quality.read_text())
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["settings"] = {"experts": args.experts, "steps": args.steps, "index": args.index.name}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))

    model = resolve_model("default", default_cache_dir())
    if not args.summarise:
        for experts in args.experts:
            build(args.index, model, experts, args.steps, results)
            save()
        evaluate(args, results, quality, save)
    results["summary"] = summarise(results, quality, args.experts)
    save()
    plot(results["summary"], args.out.with_suffix(".png"))
    print(json.dumps(results["summary"], indent=2, default=str))


if __name__ == "__main__":
    main()
