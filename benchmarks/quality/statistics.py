"""What the benchmark concludes from its runs: the calibrated stopping threshold, the cost of each
condition, the paired tests, adaptive against uniform steps, and the summary the report is made of."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from benchmarks.quality.config import UNSEEN_DOMAIN, Config
from benchmarks.quality.records import CONDITIONS, Condition, Label, PromptRuns, Results, Run, Score
from benchmarks.stats import paired, spearman
from selection.rules import Method
from selection.stopping import step_threshold

COMPARISONS: tuple[tuple[Condition, Condition], ...] = (
    (Method.SIFT, Method.NN),
    (Method.SIFT, Label.BASE),
    (Method.SIFT, Method.RANDOM),
    (Method.NN, Label.BASE),
    (Method.NN_F, Method.NN),
    (Label.ICL_NN, Label.BASE),
    (Label.ICL_SIFT, Label.ICL_NN),
    (Method.SIFT, Label.ICL_NN),
    (Method.SIFT, Label.ICL_SIFT),
    (Label.SIFT_ICL, Method.SIFT),
    (Label.SIFT_ICL, Label.ICL_SIFT),
)
IN_CONTEXT = (Label.ICL_NN, Label.ICL_SIFT, Label.SIFT_ICL)


def adaptive_steps(sigma2: list[float], min_gain: float, step_tokens: int, max_steps: int) -> int:
    """Steps the predicted-gain rule takes on a SIFT variance trace (`selection.stopping`)."""
    threshold = step_threshold(min_gain, step_tokens) * sigma2[0]
    for n in range(1, min(max_steps, len(sigma2) - 1) + 1):
        if sigma2[n - 1] - sigma2[n] < threshold:
            return n - 1
    return min(max_steps, len(sigma2) - 1)


def pooled_bpb(runs: list[Run], pick: Callable[[Run], Score]) -> float:
    rows = [pick(r) for r in runs]
    return sum(r.bits for r in rows) / sum(r.bytes for r in rows)


def _trace(run: Run) -> list[float]:
    assert run.sigma2 is not None, "a SIFT run records its variance trace"
    return run.sigma2


def calibrate(dev_runs: list[Run], config: Config) -> dict[str, Any]:
    """The largest `min_gain` in the grid whose adaptive runs keep `keep_gain` of the mean gain of
    training every step, on dev prompts (SIFT runs scored after every step)."""
    full = statistics.mean(r.at(0) - r.final.bpb for r in dev_runs)
    table = []
    for c in config.min_gain_grid:
        steps = [adaptive_steps(_trace(r), c, config.train_tokens, config.max_steps) for r in dev_runs]
        gain = statistics.mean(r.at(0) - r.at(n) for r, n in zip(dev_runs, steps, strict=True))
        table.append({"min_gain": c, "mean_steps": statistics.mean(steps), "gain": gain})
    keeping = [row for row in table if row["gain"] >= config.keep_gain * full]
    chosen = max(keeping, key=lambda row: row["min_gain"]) if keeping and full > 0 else table[0]
    return {"min_gain": chosen["min_gain"], "full_gain": full, "n": len(dev_runs), "grid": table}


def costs(reported: dict[str, PromptRuns], conditions: list[Condition]) -> dict[str, dict[str, float]]:
    """Compute per prompt and condition, measured in the in-context phase (same process, same minutes):
    the training seconds of SIFT's `max_steps` steps (NN's and random's are the same count of equally long
    windows; adaptive's are its share of them), the extra prompt tokens, and the seconds of the scoring
    forward pass (prompt + continuation, with the documents when in context)."""
    timed = [p for p in reported.values() if Label.SIFT_ICL in p and Label.ICL_NN in p]
    if not timed:
        return {}
    per_step = statistics.mean(
        (p[Label.SIFT_ICL].train_seconds or 0.0) / max(p[Label.SIFT_ICL].steps, 1) for p in timed
    )
    plain = statistics.mean(p.plain_seconds or 0.0 for p in timed)
    out = {}
    for m in conditions:
        rows = [p for p in timed if m in p]
        if not rows:
            continue
        steps = statistics.mean(p[m].steps for p in rows)
        scoring = statistics.mean(_seconds(p[m].final, plain) for p in rows) if m in IN_CONTEXT else plain
        extra = statistics.mean(p[m].final.context_tokens or 0 for p in rows)
        out[str(m)] = {
            "steps": steps,
            "train_seconds": steps * per_step,
            "context_tokens": extra,
            "scoring_seconds": scoring,
            "seconds": steps * per_step + scoring,
        }
    return out


def _seconds(score: Score, default: float) -> float:
    return default if score.seconds is None else score.seconds


def _test(a: Condition, b: Condition, where: dict[str, PromptRuns]) -> dict[str, Any]:
    both = [p for p in where.values() if a in p and b in p]
    return paired([p[a].final.bpb for p in both], [p[b].final.bpb for p in both]).as_dict()


def summarise(results: Results, config: Config) -> dict[str, Any]:
    """The headline numbers: bpb per condition and domain, the paired tests, the duplicate condition,
    adaptive against uniform, and how well SIFT's predicted gain ranks the realised one."""
    reported = results.reported
    conditions = [m for m in CONDITIONS if any(m in p for p in reported.values())]
    per_domain: dict[str, dict[str, float]] = {}
    overall_by_bytes, steps = {}, {}
    for m in conditions:
        done = [p for p in reported.values() if m in p]
        for d in sorted({p.domain for p in done}):
            runs = [p[m] for p in done if p.domain == d]
            per_domain.setdefault(d, {})[str(m)] = pooled_bpb(runs, lambda r: r.final)
        overall_by_bytes[str(m)] = pooled_bpb([p[m] for p in done], lambda r: r.final)
        steps[str(m)] = statistics.mean(p[m].steps for p in done)
    overall = {
        str(m): statistics.mean(per_domain[d][str(m)] for d in per_domain if str(m) in per_domain[d])
        for m in conditions
    }
    whole_window = {
        str(m): statistics.mean(_doc_bpb(p[m]) for p in reported.values() if m in p)
        for m in conditions
        if all(p[m].final.doc_bpb is not None for p in reported.values() if m in p)
    }
    pairs = [(a, b) for a, b in COMPARISONS if a in conditions and b in conditions]
    tests = {f"{a}_vs_{b}": _test(a, b, reported) for a, b in pairs}
    unseen = {k: p for k, p in reported.items() if p.domain == UNSEEN_DOMAIN}
    unseen_tests = {f"{a}_vs_{b}": _test(a, b, unseen) for a, b in pairs} if unseen else {}
    tests["sift_vs_nn_whole_window"] = paired(
        [_doc_bpb(p[Method.SIFT]) for p in reported.values()],
        [_doc_bpb(p[Method.NN]) for p in reported.values()],
    ).as_dict()
    assert results.learning_rate is not None and results.calibration is not None
    summary: dict[str, Any] = {
        "n_prompts": len(reported),
        "overall": overall,
        "overall_by_bytes": overall_by_bytes,
        "whole_window": whole_window,
        "per_domain": per_domain,
        "steps": steps,
        "n": {str(m): sum(m in p for p in reported.values()) for m in conditions},
        "tests": tests,
        "unseen_domain": {"domain": UNSEEN_DOMAIN, "tests": unseen_tests},
        "cost": costs(reported, conditions),
        "learning_rate": results.learning_rate,
        "min_gain": results.calibration["min_gain"],
        "contamination": results.contamination,
    }
    if results.duplicates:
        summary["duplicates"] = _duplicates(results.duplicates)
    summary["adaptive_vs_uniform"] = results.adaptive_vs_uniform
    summary["predicted_vs_realised_gain"] = spearman(
        [1 - _trace(p[Method.SIFT])[-1] / _trace(p[Method.SIFT])[0] for p in reported.values()],
        [p[Label.BASE].final.bpb - p[Method.SIFT].final.bpb for p in reported.values()],
    )
    if results.seeds:
        summary["seed_noise"] = {str(m): _seed_noise(results, m) for m in (Method.SIFT, Method.NN)}
    return summary


def _doc_bpb(run: Run) -> float:
    assert run.final.doc_bpb is not None, "the last step is scored with the whole window"
    return run.final.doc_bpb


def _duplicates(dup: dict[str, PromptRuns]) -> dict[str, Any]:
    dmethods = [m for m in (Method.NN, Method.NN_F, Method.SIFT) if all(m in p for p in dup.values())]
    return {
        "n": len(dup),
        "overall": {str(m): statistics.mean(p[m].final.bpb for p in dup.values()) for m in dmethods},
        "distinct_picks": {str(m): statistics.mean(p[m].distinct_texts or 0 for p in dup.values()) for m in dmethods},
        "tests": {f"{a}_vs_nn": _test(a, Method.NN, dup) for a in (Method.NN_F, Method.SIFT) if a in dmethods},
        "sift_vs_nn_f": _test(Method.SIFT, Method.NN_F, dup) if {Method.SIFT, Method.NN_F} <= set(dmethods) else None,
    }


def _seed_noise(results: Results, m: Method) -> dict[str, float]:
    diffs = [abs(s[m].final.bpb - results.reported[pid][m].final.bpb) for pid, s in results.seeds.items()]
    return {"n": len(results.seeds), "mean_abs_diff": statistics.mean(diffs), "max_abs_diff": max(diffs)}


def adaptive_vs_uniform(reported: dict[str, PromptRuns], config: Config) -> dict[str, Any]:
    """Adaptive (each prompt its own steps) against uniform steps at the same mean, on SIFT's curves."""
    prompts = list(reported.values())
    mean_steps = statistics.mean(p[Label.ADAPTIVE].steps for p in prompts)
    adaptive = [p[Label.ADAPTIVE].final.bpb for p in prompts]
    uniform = [p[Method.SIFT].at(mean_steps) for p in prompts]
    test = paired(adaptive, uniform).as_dict()
    curve_uniform = [
        {"steps": n, "bpb": statistics.mean(p[Method.SIFT].at(n) for p in prompts)} for n in range(config.max_steps + 1)
    ]
    curve_adaptive = []
    for c in config.min_gain_grid:
        steps = [adaptive_steps(_trace(p[Method.SIFT]), c, config.train_tokens, config.max_steps) for p in prompts]
        curve_adaptive.append(
            {
                "min_gain": c,
                "steps": statistics.mean(steps),
                "bpb": statistics.mean(p[Method.SIFT].at(n) for p, n in zip(prompts, steps, strict=True)),
            }
        )
    return {
        "n": len(prompts),
        "steps": mean_steps,
        "adaptive": statistics.mean(adaptive),
        "uniform": statistics.mean(uniform),
        "all_steps": statistics.mean(p[Method.SIFT].final.bpb for p in prompts),
        "base": statistics.mean(p[Label.BASE].final.bpb for p in prompts),
        "ci": [test["ci_low"], test["ci_high"]],
        "test": test,
        "curve_uniform": curve_uniform,
        "curve_adaptive": curve_adaptive,
    }
