"""Quality benchmark: does test-time fine-tuning on SIFT's picks beat nearest neighbours, and does the
predicted-gain stopping rule spend steps where they pay? (DESIGN.md 4 and 8)

    python -m benchmarks.quality --config cpu --corpus DIR --index DIR [--out benchmarks/results]

Prompts are documents of the corpus's held-out families (`benchmarks.corpus.build`; one per family):
prompt = the first P tokens, evaluation = the next E tokens, scored as bits per byte of the continuation
given the prompt (and, at the last step, of the whole P + E window). Every method trains a fresh adapter
with the project's `Trainer` on its own picks from the same K candidates of the index over the train side,
one step per pick, scored along the way. In order, each phase saved as it goes (a killed run resumes):

1. Learning rate, per method (SIFT and NN each at its own best), on dev prompts.
2. Calibration of the stopping threshold `min_gain` on dev prompts: the largest threshold whose
   adaptive runs keep `keep_gain` of the gain of training every step.
3. Reported prompts: base, SIFT (scored after every step), NN and NN-F (at the checkpoints). Adaptive
   SIFT is the product's rule (`SelectOptions.min_gain`); it picks a prefix of SIFT's picks, and
   training is deterministic and one step per pick, so its score is SIFT's curve at its own step count
   (checked by training one prompt separately). Uniform = SIFT's curve at the adaptive mean steps.
4. The duplicate condition (`benchmarks.duplicates`): NN, NN-F and SIFT on an index where a third of the
   chunks appear three times.
5. Random picks, and a second seed for SIFT and NN (seed noise).

Identical training inputs (same prompt, picks, learning rate and seed) are trained once: a method whose
picks equal another's reuses that run, and says so (`same_as`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from adapters.config import TrainerConfig
from adapters.trainer import Trainer, TrainRequest, TrainStep
from benchmarks.bpb import continuation_bits
from benchmarks.corpus.ngrams import hash_set, overlap
from benchmarks.duplicates import duplicate_index
from benchmarks.stats import paired, spearman
from infra.config import default_cache_dir
from infra.models import resolve_model
from selection.embed import load_embedder
from selection.index import CorpusIndex
from selection.rules import Method
from selection.selector import SelectOptions, Selector
from selection.stopping import step_threshold
from serving.context import as_text, fit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    prompt_tokens: int
    eval_tokens: int
    train_tokens: int
    max_steps: int
    checkpoints: tuple[int, ...]
    prompts_per_domain: int
    dev_prompts_per_domain: int
    sweep_prompts: int
    learning_rates: tuple[float, ...]
    duplicate_prompts_per_domain: int
    random_prompts_per_domain: int
    seed_prompts_per_domain: int
    keep_gain: float = 0.9
    min_gain_grid: tuple[float, ...] = tuple(float(x) for x in np.geomspace(0.002, 2.0, 31))
    context_tokens: int = 520
    """In-context methods: the most prompt tokens the documents may add (four 128-token chunks and their
    separators)."""
    candidates: int = 200
    lambda_: float = 0.01
    rank: int = 16


CONFIGS = {
    "cpu": Config(
        prompt_tokens=128,
        eval_tokens=256,
        train_tokens=128,
        max_steps=16,
        checkpoints=(1, 2, 4, 8, 12, 16),
        prompts_per_domain=6,
        dev_prompts_per_domain=2,
        sweep_prompts=3,
        learning_rates=(2e-4, 5e-4, 1.5e-3),
        duplicate_prompts_per_domain=3,
        random_prompts_per_domain=3,
        seed_prompts_per_domain=1,
    ),
    "paper": Config(
        prompt_tokens=512,
        eval_tokens=512,
        train_tokens=1024,
        max_steps=50,
        checkpoints=(1, 2, 5, 10, 20, 30, 40, 50),
        prompts_per_domain=20,
        dev_prompts_per_domain=5,
        sweep_prompts=10,
        learning_rates=(5e-5, 1e-4, 5e-4, 1e-3),
        duplicate_prompts_per_domain=10,
        random_prompts_per_domain=10,
        seed_prompts_per_domain=3,
    ),
}


@dataclass(frozen=True)
class Prompt:
    id: str
    domain: str
    family: str
    ids: list[int]


def _order(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def read_jsonl(path: Path) -> Iterator[dict]:
    """The records of a JSON-lines file (split on newlines only: texts may hold other line separators)."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def load_prompts(path: Path, tokenizer, need: int, per_domain: int) -> list[Prompt]:
    """Up to `per_domain` prompts per domain, one per family (its first document long enough in a stable
    hash order), domains in name order."""
    by_family: dict[str, Prompt] = {}
    for doc in read_jsonl(path):
        if doc["family"] in by_family and _order(by_family[doc["family"]].id) < _order(doc["id"]):
            continue
        ids = tokenizer(doc["text"], add_special_tokens=False).input_ids
        if len(ids) >= need:
            by_family[doc["family"]] = Prompt(doc["id"], doc["domain"], doc["family"], ids[:need])
    by_domain: dict[str, list[Prompt]] = {}
    for prompt in sorted(by_family.values(), key=lambda p: _order(p.family)):
        by_domain.setdefault(prompt.domain, []).append(prompt)
    return [p for d in sorted(by_domain) for p in by_domain[d][:per_domain]]


def per_domain(prompts: list[Prompt], k: int) -> list[Prompt]:
    """The first `k` prompts of each domain."""
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        seen[p.domain] = seen.get(p.domain, 0) + 1
        if seen[p.domain] <= k:
            out.append(p)
    return out


def contamination(prompts: Iterable[Prompt], tokenizer, train: Path, prompt_tokens: int) -> dict[str, int]:
    """Per prompt, how many word 13-grams of its continuation occur anywhere on the train side."""
    reference = hash_set(doc["text"] for doc in read_jsonl(train))
    return {p.id: overlap(tokenizer.decode(p.ids[prompt_tokens:]), reference) for p in prompts}


def adaptive_steps(sigma2: list[float], min_gain: float, step_tokens: int, max_steps: int) -> int:
    """Steps the predicted-gain rule takes on a SIFT variance trace (`selection.stopping`)."""
    threshold = step_threshold(min_gain, step_tokens) * sigma2[0]
    for n in range(1, min(max_steps, len(sigma2) - 1) + 1):
        if sigma2[n - 1] - sigma2[n] < threshold:
            return n - 1
    return min(max_steps, len(sigma2) - 1)


def at(run: dict, step: float) -> float:
    """bpb of a run after `step` steps; between two integers, linearly interpolated (a mix of the two)."""
    lo, hi = math.floor(step), math.ceil(step)
    low, high = run["curve"][str(lo)]["bpb"], run["curve"][str(hi)]["bpb"]
    return low + (high - low) * (step - lo)


class Evaluator:
    """Trains one method's picks for one prompt and scores the adapter along the way."""

    def __init__(self, trainer: Trainer, tokenizer, config: Config) -> None:
        self.trainer, self.tokenizer, self.config = trainer, tokenizer, config
        self.runs: dict[str, dict] = {}
        """Runs by training key (prompt, picks, learning rate, seed), for reuse."""

    def score(self, prompt: Prompt, view, whole: bool = False, documents: Sequence[str] = ()) -> dict[str, float]:
        """Bits per byte of the continuation (and with `whole`, of the whole window) under `view`; with
        `documents`, as many of them as fit `context_tokens` are placed before the prompt (the bytes scored
        are the same). `seconds` is the scoring forward pass, `context_tokens` what the documents added."""
        p = self.config.prompt_tokens
        context, continuation = prompt.ids[:p], prompt.ids[p:]
        added = 0
        if documents:

            def render(docs: Sequence[str]) -> list[int]:
                return (self.tokenizer(as_text(docs), add_special_tokens=False).input_ids if docs else []) + context

            full, added = fit(documents, self.config.context_tokens, render, len(context))
            context = full
        cont_bytes = len(self.tokenizer.decode(continuation).encode("utf-8"))
        with view as model:
            started = time.monotonic()
            bits = continuation_bits(model, context, continuation)
            out = {"bpb": bits / cont_bytes, "bits": bits, "bytes": cont_bytes, "seconds": time.monotonic() - started}
            if documents:
                out.update(context_documents=added, context_tokens=len(context) - p)
            if whole:
                prefix = self.tokenizer.bos_token_id
                prefix = self.tokenizer.eos_token_id if prefix is None else prefix
                doc_bits = continuation_bits(model, [prefix], prompt.ids)
                doc_bytes = len(self.tokenizer.decode(prompt.ids).encode("utf-8"))
                out.update(doc_bpb=doc_bits / doc_bytes, doc_bits=doc_bits, doc_bytes=doc_bytes)
        return out

    def base(self, prompt: Prompt) -> dict:
        score = self.score(prompt, self.trainer.adapted(None), whole=True)
        return {"steps": 0, "curve": {"0": score}, "final": score}

    def run(
        self,
        prompt: Prompt,
        selector: Selector,
        method: Method,
        learning_rate: float,
        seed: int,
        score_at: Iterable[int],
        base: dict,
        n: int | None = None,
        in_context: bool = False,
    ) -> dict:
        """Select `n` (default `max_steps`) picks with `method`, train on them one step each, score after
        the steps in `score_at` (and the last, with the whole-window view); with `in_context`, also score
        the last adapter with the picks placed before the prompt (`icl`)."""
        text = self.tokenizer.decode(prompt.ids[: self.config.prompt_tokens])
        options = SelectOptions(
            n or self.config.max_steps,
            method,
            lambda_=self.config.lambda_,
            candidates=self.config.candidates,
            seed=seed,
        )
        picked = selector.select([text], options)[0]
        texts = [d.text for d in picked.documents]
        key = _order(json.dumps([prompt.id, texts, learning_rate, seed, *(["icl"] if in_context else [])]))
        wanted = {s for s in score_at if s <= len(texts)} | {len(texts)}
        reused = self.runs.get(key)
        if reused is not None and wanted <= {int(s) for s in reused["curve"]}:
            return {**reused, "same_as": reused.get("same_as") or reused["label"], "label": str(method)}
        started = time.monotonic()
        curve = {"0": base["final"]}
        icl: dict[str, dict] = {}
        request = TrainRequest(documents=texts, learning_rate=learning_rate, seed=seed)

        def after(done: TrainStep) -> None:
            if done.step in wanted:
                view = self.trainer.training(request)
                curve[str(done.step)] = self.score(prompt, view, whole=done.step == len(texts))
                if in_context and done.step == len(texts):
                    icl[str(done.step)] = self.score(prompt, self.trainer.training(request), documents=texts)

        result = self.trainer.train(request, progress=after)
        run = {
            "label": str(method),
            "key": key,
            "steps": result.steps,
            "curve": curve,
            "final": curve[str(result.steps)],
            "sigma2": picked.sigma2,
            "documents": [d.id for d in picked.documents],
            "repeats": picked.repeats,
            "losses": result.losses,
            "seconds": time.monotonic() - started,
            "train_seconds": result.train_seconds,
        }
        if in_context:
            run["icl"] = icl[str(result.steps)]
        self.runs[key] = run
        return run

    def in_context(self, prompt: Prompt, selector: Selector, method: Method, base: dict) -> dict:
        """The base model with `method`'s picks placed before the prompt (in-context retrieval)."""
        text = self.tokenizer.decode(prompt.ids[: self.config.prompt_tokens])
        options = SelectOptions(
            self.config.max_steps, method, lambda_=self.config.lambda_, candidates=self.config.candidates
        )
        picked = selector.select([text], options)[0]
        score = self.score(prompt, self.trainer.adapted(None), documents=[d.text for d in picked.documents])
        return {
            "steps": 0,
            "curve": {"0": base["final"]},
            "final": score,
            "documents": [d.id for d in picked.documents],
        }

    def remember(self, runs: Iterable[dict]) -> None:
        """Make saved runs (from a resumed results file) available for reuse."""
        for run in runs:
            if "key" in run and "same_as" not in run:
                self.runs.setdefault(run["key"], run)


def pooled_bpb(runs: list[dict], pick: Callable[[dict], dict]) -> float:
    rows = [pick(r) for r in runs]
    return sum(r["bits"] for r in rows) / sum(r["bytes"] for r in rows)


def calibrate(dev_runs: list[dict], config: Config) -> dict:
    """The largest `min_gain` in the grid whose adaptive runs keep `keep_gain` of the mean gain of
    training every step, on dev prompts (SIFT runs scored after every step)."""
    full = statistics.mean(r["curve"]["0"]["bpb"] - r["final"]["bpb"] for r in dev_runs)
    table = []
    for c in config.min_gain_grid:
        steps = [adaptive_steps(r["sigma2"], c, config.train_tokens, config.max_steps) for r in dev_runs]
        gain = statistics.mean(r["curve"]["0"]["bpb"] - at(r, n) for r, n in zip(dev_runs, steps, strict=True))
        table.append({"min_gain": c, "mean_steps": statistics.mean(steps), "gain": gain})
    keeping = [row for row in table if row["gain"] >= config.keep_gain * full]
    chosen = max(keeping, key=lambda row: row["min_gain"]) if keeping and full > 0 else table[0]
    return {"min_gain": chosen["min_gain"], "full_gain": full, "n": len(dev_runs), "grid": table}


METHODS = ("base", "nn", "nn_f", "random", "sift", "adaptive", "icl_nn", "icl_sift", "sift_icl")
COMPARISONS = (
    ("sift", "nn"),
    ("sift", "base"),
    ("sift", "random"),
    ("nn", "base"),
    ("nn_f", "nn"),
    ("icl_nn", "base"),
    ("icl_sift", "icl_nn"),
    ("sift", "icl_nn"),
    ("sift", "icl_sift"),
    ("sift_icl", "sift"),
    ("sift_icl", "icl_sift"),
)
UNSEEN_DOMAIN = "releases"
"""The domain of text written after the base model's release."""


def costs(reported: dict, methods: list[str], config: Config) -> dict[str, dict[str, float]]:
    """Compute per prompt and method, measured in the in-context phase (same process, same minutes): the
    training seconds of SIFT's `max_steps` steps (NN's and random's are the same count of equally long
    windows; adaptive's are its share of them), the extra prompt tokens, and the seconds of the scoring
    forward pass (prompt + continuation, with the documents when in context)."""
    timed = [p for p in reported.values() if "sift_icl" in p and "icl_nn" in p]
    if not timed:
        return {}
    per_step = statistics.mean(p["sift_icl"]["train_seconds"] / max(p["sift_icl"]["steps"], 1) for p in timed)
    plain = statistics.mean(p["plain_seconds"] for p in timed)
    out = {}
    for m in methods:
        rows = [p for p in timed if m in p]
        if not rows:
            continue
        steps = statistics.mean(p[m]["steps"] for p in rows)
        scoring = (
            statistics.mean(p[m]["final"].get("seconds", plain) for p in rows)
            if m.startswith(("icl", "sift_icl"))
            else plain
        )
        extra = statistics.mean(p[m]["final"].get("context_tokens", 0) for p in rows)
        out[m] = {
            "steps": steps,
            "train_seconds": steps * per_step,
            "context_tokens": extra,
            "scoring_seconds": scoring,
            "seconds": steps * per_step + scoring,
        }
    return out


def summarise(results: dict, config: Config) -> dict:
    """The headline numbers: bpb per method and domain, the paired tests, the duplicate condition,
    adaptive against uniform, and how well SIFT's predicted gain ranks the realised one."""
    reported = results["reported"]
    methods = [m for m in METHODS if any(m in p for p in reported.values())]
    per_domain: dict[str, dict[str, float]] = {}
    overall_by_bytes, steps = {}, {}
    for m in methods:
        done = [p for p in reported.values() if m in p]
        for d in sorted({p["domain"] for p in done}):
            runs = [p[m] for p in done if p["domain"] == d]
            per_domain.setdefault(d, {})[m] = pooled_bpb(runs, lambda r: r["final"])
        overall_by_bytes[m] = pooled_bpb([p[m] for p in done], lambda r: r["final"])
        steps[m] = statistics.mean(p[m]["steps"] for p in done)
    overall = {m: statistics.mean(per_domain[d][m] for d in per_domain if m in per_domain[d]) for m in methods}
    whole_window = {
        m: statistics.mean(p[m]["final"]["doc_bpb"] for p in reported.values() if m in p)
        for m in methods
        if all("doc_bpb" in p[m]["final"] for p in reported.values() if m in p)
    }

    def test(a: str, b: str, where: dict) -> dict:
        both = [p for p in where.values() if a in p and b in p]
        return paired([p[a]["final"]["bpb"] for p in both], [p[b]["final"]["bpb"] for p in both]).as_dict()

    pairs = [(a, b) for a, b in COMPARISONS if a in methods and b in methods]
    tests = {f"{a}_vs_{b}": test(a, b, reported) for a, b in pairs}
    unseen = {k: p for k, p in reported.items() if p["domain"] == UNSEEN_DOMAIN}
    unseen_tests = {f"{a}_vs_{b}": test(a, b, unseen) for a, b in pairs} if unseen else {}
    tests["sift_vs_nn_whole_window"] = paired(
        [p["sift"]["final"]["doc_bpb"] for p in reported.values()],
        [p["nn"]["final"]["doc_bpb"] for p in reported.values()],
    ).as_dict()
    summary: dict = {
        "n_prompts": len(reported),
        "overall": overall,
        "overall_by_bytes": overall_by_bytes,
        "whole_window": whole_window,
        "per_domain": per_domain,
        "steps": steps,
        "n": {m: sum(m in p for p in reported.values()) for m in methods},
        "tests": tests,
        "unseen_domain": {"domain": UNSEEN_DOMAIN, "tests": unseen_tests},
        "cost": costs(reported, methods, config),
        "learning_rate": results["learning_rate"],
        "min_gain": results["calibration"]["min_gain"],
        "contamination": results["contamination"],
    }
    dup = results.get("duplicates", {})
    if dup:
        dmethods = [m for m in ("nn", "nn_f", "sift") if all(m in p for p in dup.values())]
        summary["duplicates"] = {
            "n": len(dup),
            "overall": {m: statistics.mean(p[m]["final"]["bpb"] for p in dup.values()) for m in dmethods},
            "distinct_picks": {m: statistics.mean(p[m]["distinct_texts"] for p in dup.values()) for m in dmethods},
            "tests": {f"{a}_vs_nn": test(a, "nn", dup) for a in ("nn_f", "sift") if a in dmethods},
            "sift_vs_nn_f": test("sift", "nn_f", dup) if {"sift", "nn_f"} <= set(dmethods) else None,
        }
    summary["adaptive_vs_uniform"] = results["adaptive_vs_uniform"]
    summary["predicted_vs_realised_gain"] = spearman(
        [1 - p["sift"]["sigma2"][-1] / p["sift"]["sigma2"][0] for p in reported.values()],
        [p["base"]["final"]["bpb"] - p["sift"]["final"]["bpb"] for p in reported.values()],
    )
    seeds = results.get("seeds", {})
    if seeds:
        summary["seed_noise"] = {
            m: {
                "n": len(seeds),
                "mean_abs_diff": statistics.mean(
                    abs(s[m]["final"]["bpb"] - reported[pid][m]["final"]["bpb"]) for pid, s in seeds.items()
                ),
                "max_abs_diff": max(
                    abs(s[m]["final"]["bpb"] - reported[pid][m]["final"]["bpb"]) for pid, s in seeds.items()
                ),
            }
            for m in ("sift", "nn")
        }
    return summary


def adaptive_vs_uniform(reported: dict, config: Config) -> dict:
    """Adaptive (each prompt its own steps) against uniform steps at the same mean, on SIFT's curves."""
    prompts = list(reported.values())
    mean_steps = statistics.mean(p["adaptive"]["steps"] for p in prompts)
    adaptive = [p["adaptive"]["final"]["bpb"] for p in prompts]
    uniform = [at(p["sift"], mean_steps) for p in prompts]
    test = paired(adaptive, uniform).as_dict()
    curve_uniform = [
        {"steps": n, "bpb": statistics.mean(at(p["sift"], n) for p in prompts)} for n in range(config.max_steps + 1)
    ]
    curve_adaptive = []
    for c in config.min_gain_grid:
        steps = [adaptive_steps(p["sift"]["sigma2"], c, config.train_tokens, config.max_steps) for p in prompts]
        curve_adaptive.append(
            {
                "min_gain": c,
                "steps": statistics.mean(steps),
                "bpb": statistics.mean(at(p["sift"], n) for p, n in zip(prompts, steps, strict=True)),
            }
        )
    return {
        "n": len(prompts),
        "steps": mean_steps,
        "adaptive": statistics.mean(adaptive),
        "uniform": statistics.mean(uniform),
        "all_steps": statistics.mean(p["sift"]["final"]["bpb"] for p in prompts),
        "base": statistics.mean(p["base"]["final"]["bpb"] for p in prompts),
        "ci": [test["ci_low"], test["ci_high"]],
        "test": test,
        "curve_uniform": curve_uniform,
        "curve_adaptive": curve_adaptive,
    }


def markdown(summary: dict) -> str:
    methods = list(summary["overall"])
    lines = ["| domain | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for d, row in sorted(summary["per_domain"].items()):
        lines.append(f"| {d} | " + " | ".join(f"{row[m]:.3f}" if m in row else "" for m in methods) + " |")
    lines.append("| **overall** | " + " | ".join(f"**{summary['overall'][m]:.3f}**" for m in methods) + " |")
    lines.append("| steps | " + " | ".join(f"{summary['steps'][m]:.1f}" for m in methods) + " |")
    lines.append("| prompts | " + " | ".join(str(summary["n"][m]) for m in methods) + " |")
    lines += [
        "",
        "| comparison | n | mean diff (bpb) | 95% CI | Wilcoxon p | A better / B better |",
        "|---|---|---|---|---|---|",
    ]
    tests = dict(summary["tests"])
    for name, t in summary.get("duplicates", {}).get("tests", {}).items():
        tests[f"duplicates: {name}"] = t
    for name, t in summary["unseen_domain"]["tests"].items():
        tests[f"{summary['unseen_domain']['domain']} only: {name}"] = t
    avu = summary["adaptive_vs_uniform"]
    tests[f"adaptive vs uniform ({avu['steps']:.1f} steps)"] = avu["test"]
    for name, t in tests.items():
        lines.append(
            f"| {name} | {t['n']} | {t['mean_diff']:+.4f} | [{t['ci_low']:+.4f}, {t['ci_high']:+.4f}] | "
            f"{t['p_value']:.3g} | {t['a_better']} / {t['b_better']} |"
        )
    return "\n".join(lines) + "\n"


def plots(results: dict, summary: dict, config: Config, out: Path, name: str) -> None:
    """Curves per domain (SIFT and NN against steps), the duplicate condition, adaptive against uniform."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reported = list(results["reported"].values())
    domains = sorted({p["domain"] for p in reported})
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(domains) / cols), cols, figsize=(14, 6.5), squeeze=False)
    steps = (0, *config.checkpoints)
    for ax, domain in zip(axes.flat, domains, strict=False):
        rows = [p for p in reported if p["domain"] == domain]
        for m in ("sift", "nn"):
            ax.plot(steps, [statistics.mean(at(p[m], s) for p in rows) for s in steps], marker="o", label=m)
        ax.set_title(f"{domain} ({len(rows)} prompts)", fontsize=9)
        ax.set_xlabel("steps", fontsize=8)
    for ax in list(axes.flat)[len(domains) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("bits per byte (continuation)")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"quality-{name}-curves.png", dpi=110)
    plt.close(fig)

    dup = list(results.get("duplicates", {}).values())
    if dup:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        dsteps = (0, *[s for s in config.checkpoints if all(str(s) in p["nn"]["curve"] for p in dup)])
        for m in ("nn", "nn_f", "sift"):
            ax.plot(dsteps, [statistics.mean(at(p[m], s) for p in dup) for s in dsteps], marker="o", label=m)
        ax.set_xlabel("steps")
        ax.set_ylabel("bits per byte (continuation)")
        ax.set_title(f"a third of the chunks three times ({len(dup)} prompts)", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"quality-{name}-duplicates.png", dpi=110)
        plt.close(fig)

    cost = summary.get("cost")
    if cost:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for m, c in cost.items():
            ax.scatter([c["seconds"]], [summary["overall"][m]])
            ax.annotate(m, (c["seconds"], summary["overall"][m]), fontsize=8, xytext=(4, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("seconds per prompt on this CPU (training + scoring pass)")
        ax.set_ylabel("bits per byte (continuation), domains equal")
        fig.tight_layout()
        fig.savefig(out / f"quality-{name}-compute.png", dpi=110)
        plt.close(fig)

    avu = summary["adaptive_vs_uniform"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([r["steps"] for r in avu["curve_uniform"]], [r["bpb"] for r in avu["curve_uniform"]], label="uniform steps")
    ax.plot(
        [r["steps"] for r in avu["curve_adaptive"]],
        [r["bpb"] for r in avu["curve_adaptive"]],
        marker=".",
        label="adaptive (min_gain grid)",
    )
    ax.scatter(
        [avu["steps"]], [avu["adaptive"]], color="red", zorder=3, label=f"default min_gain={summary['min_gain']:.3g}"
    )
    ax.set_xlabel("mean training steps (compute)")
    ax.set_ylabel("bits per byte (continuation)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"quality-{name}-adaptive.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--corpus", type=Path, default=default_cache_dir() / "corpus")
    parser.add_argument("--index", type=Path, required=True, help="index over CORPUS/train.jsonl")
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--summarise-only", action="store_true", help="recompute the summary of a saved run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = CONFIGS[args.config]
    path = args.out / f"quality-{args.config}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("config", {**asdict(config), "name": args.config})
    for phase in ("sweep", "calibration_runs", "reported", "duplicates", "seeds"):
        results.setdefault(phase, {})

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))

    if not args.summarise_only:
        run_protocol(results, config, args, save)
    summary = summarise(results, config)
    results["summary"] = summary
    save()
    plots(results, summary, config, args.out, args.config)
    table = markdown(summary)
    (args.out / f"quality-{args.config}.md").write_text(table)
    print(table)
    print(f"wrote {path}")


def run_protocol(results: dict, config: Config, args: argparse.Namespace, save: Callable[[], None]) -> None:
    model_dir = resolve_model(args.model, default_cache_dir())
    embedder = load_embedder("minilm", model_dir)
    selector = Selector(CorpusIndex.load(args.index, embedder), embedder)
    trainer = Trainer(
        model_dir,
        TrainerConfig(
            max_steps=config.max_steps,
            max_train_tokens=config.train_tokens,
            time_budget_s=None,
            rank=config.rank,
            device=args.device,
        ),
    )
    tok = trainer.tokenizer
    ev = Evaluator(trainer, tok, config)
    for phase in ("sweep", "calibration_runs", "reported", "duplicates", "seeds"):
        for entry in results[phase].values():
            ev.remember(v for v in entry.values() if isinstance(v, dict))
    need = config.prompt_tokens + config.eval_tokens
    dev = load_prompts(args.corpus / "dev.jsonl", tok, need, config.dev_prompts_per_domain)
    reported = load_prompts(args.corpus / "heldout.jsonl", tok, need, config.prompts_per_domain)
    log.info("%d reported prompts, %d dev prompts", len(reported), len(dev))
    if "contamination" not in results:
        counts = contamination(reported, tok, args.corpus / "train.jsonl", config.prompt_tokens)
        results["contamination"] = {
            "shared_13grams": sum(counts.values()),
            "prompts": len(counts),
            "per_prompt": counts,
        }
        save()
    if results["contamination"]["shared_13grams"] != 0:
        raise SystemExit(f"held-out continuations share 13-grams with the train side: {results['contamination']}")
    ends = {"sweep": (config.max_steps,), "curve": config.checkpoints, "every": range(1, config.max_steps + 1)}
    bases: dict[str, dict] = {}

    def base_of(p: Prompt) -> dict:
        if p.id not in bases:
            bases[p.id] = results["reported"].get(p.id, {}).get("base") or ev.base(p)
        return bases[p.id]

    def run_into(
        phase: str, p: Prompt, label: str, method: Method, lr: float, seed: int, at_steps, sel=selector
    ) -> dict:
        entry = results[phase].setdefault(p.id, {"domain": p.domain})
        if label not in entry:
            entry[label] = ev.run(p, sel, method, lr, seed, at_steps, base_of(p))
            save()
        return entry[label]

    # 1. learning rate per method, on dev prompts
    sweep_prompts = dev[: config.sweep_prompts]
    if "learning_rates" not in results:
        for method in (Method.SIFT, Method.NN):
            for lr in config.learning_rates:
                for p in tqdm(sweep_prompts, desc=f"sweep {method} lr {lr:g}"):
                    run_into("sweep", p, f"{method}@{lr:g}", method, lr, 0, ends["sweep"])
        table = {
            str(m): {
                f"{lr:g}": pooled_bpb(
                    [results["sweep"][p.id][f"{m}@{lr:g}"] for p in sweep_prompts], lambda r: r["final"]
                )
                for lr in config.learning_rates
            }
            for m in (Method.SIFT, Method.NN)
        }
        results["learning_rate_sweep"] = table
        results["learning_rates"] = {m: float(min(row, key=row.get)) for m, row in table.items()}
        save()
    lrs = results["learning_rates"]
    results["learning_rate"] = lrs
    log.info("learning rates %s (sweep %s)", lrs, results["learning_rate_sweep"])

    # 2. the stopping threshold, on dev prompts
    for p in tqdm(dev, desc="calibration"):
        run_into("calibration_runs", p, "sift", Method.SIFT, lrs["sift"], 0, ends["every"])
    results["calibration"] = calibrate([results["calibration_runs"][p.id]["sift"] for p in dev], config)
    min_gain = results["calibration"]["min_gain"]
    save()
    log.info(
        "calibrated min_gain %.4g (%s)", min_gain, {k: v for k, v in results["calibration"].items() if k != "grid"}
    )

    # 3. reported prompts
    for p in tqdm(reported, desc="reported"):
        entry = results["reported"].setdefault(p.id, {"domain": p.domain})
        if "base" not in entry:
            entry["base"] = base_of(p)
        run_into("reported", p, "sift", Method.SIFT, lrs["sift"], 0, ends["every"])
        run_into("reported", p, "nn", Method.NN, lrs["nn"], 0, ends["curve"])
        run_into("reported", p, "nn_f", Method.NN_F, lrs["nn"], 0, ends["curve"])
        if "adaptive" not in entry:
            entry["adaptive"] = adaptive_run(selector, tok, p, entry["sift"], min_gain, config)
            save()
    first = next((p for p in reported if results["reported"][p.id]["adaptive"]["steps"] > 0), reported[0])
    if "prefix_check" not in results:
        results["prefix_check"] = prefix_check(
            ev, selector, first, results["reported"][first.id], lrs["sift"], base_of(first)
        )
        save()
    results["adaptive_vs_uniform"] = adaptive_vs_uniform(results["reported"], config)
    save()

    # 4. the duplicate condition
    dup_dir = args.index.with_name(args.index.name + "-duplicated")
    if not (dup_dir / "manifest.json").exists():
        duplicate_index(args.index, dup_dir)
    dup_selector = Selector(CorpusIndex.load(dup_dir, embedder), embedder)
    for p in tqdm(per_domain(reported, config.duplicate_prompts_per_domain), desc="duplicates"):
        for method, lr in ((Method.NN, lrs["nn"]), (Method.NN_F, lrs["nn"]), (Method.SIFT, lrs["sift"])):
            run = run_into("duplicates", p, str(method), method, lr, 0, ends["curve"], dup_selector)
            if "distinct_texts" not in run:
                run["distinct_texts"] = len(set(d.split("#copy")[0] for d in run["documents"]))
                save()

    # 5. random picks, and a second seed
    for p in tqdm(per_domain(reported, config.random_prompts_per_domain), desc="random"):
        run_into("reported", p, "random", Method.RANDOM, lrs["sift"], 0, ends["sweep"])
    for p in tqdm(per_domain(reported, config.seed_prompts_per_domain), desc="seed 1"):
        run_into("seeds", p, "sift", Method.SIFT, lrs["sift"], 1, ends["sweep"])
        run_into("seeds", p, "nn", Method.NN, lrs["nn"], 1, ends["sweep"])

    # 6. in-context retrieval: the picks before the prompt, on the base model and on the adapted one
    for p in tqdm(reported, desc="in context"):
        entry = results["reported"][p.id]
        for label, method in (("icl_nn", Method.NN), ("icl_sift", Method.SIFT)):
            if label not in entry:
                entry[label] = ev.in_context(p, selector, method, base_of(p))
                save()
        if "plain_seconds" not in entry:
            entry["plain_seconds"] = ev.score(p, trainer.adapted(None))["seconds"]
        if "sift_icl" not in entry:
            run = ev.run(p, selector, Method.SIFT, lrs["sift"], 0, ends["sweep"], base_of(p), in_context=True)
            entry["sift_icl"] = {**run, "final": run["icl"]}
            save()


def adaptive_run(selector: Selector, tokenizer, prompt: Prompt, sift: dict, min_gain: float, config: Config) -> dict:
    """The product's predicted-gain rule on this prompt: its steps, and SIFT's score after that many."""
    text = tokenizer.decode(prompt.ids[: config.prompt_tokens])
    options = SelectOptions(
        config.max_steps,
        lambda_=config.lambda_,
        candidates=config.candidates,
        min_gain=min_gain,
        step_tokens=config.train_tokens,
    )
    picked = selector.select([text], options)[0]
    steps = len(picked.documents)
    ids = [d.id for d in picked.documents]
    if ids != sift["documents"][:steps]:
        raise RuntimeError(f"{prompt.id}: adaptive picks {ids} are not a prefix of SIFT's {sift['documents']}")
    derived = adaptive_steps(sift["sigma2"], min_gain, config.train_tokens, config.max_steps)
    if derived != steps:  # only where a gain sits within float32 rounding of the threshold
        log.warning("%s: the selector stopped after %d steps, the variance trace says %d", prompt.id, steps, derived)
    return {
        "steps": steps,
        "trace_steps": derived,
        "stop_reason": str(picked.stop_reason),
        "final": sift["curve"][str(steps)],
    }


def prefix_check(ev: Evaluator, selector: Selector, prompt: Prompt, entry: dict, lr: float, base: dict) -> dict:
    """Train one prompt's adaptive picks on their own and compare with SIFT's curve at that step: the
    reuse of SIFT's curve for adaptive and uniform steps rests on this equality."""
    steps = entry["adaptive"]["steps"]
    if steps == 0:
        return {"prompt": prompt.id, "steps": 0, "abs_diff": 0.0}
    alone = ev.run(prompt, selector, Method.SIFT, lr, 0, (steps,), base, n=steps)
    diff = abs(alone["final"]["bpb"] - entry["sift"]["curve"][str(steps)]["bpb"])
    return {
        "prompt": prompt.id,
        "steps": steps,
        "abs_diff": diff,
        "same_picks": alone["documents"] == entry["sift"]["documents"][:steps],
    }


if __name__ == "__main__":
    main()
