"""What the benchmark decides from its runs, before the held-out prompts (the recipe, the rates, the
stopping threshold) and after them (the pre-registered tests, in `endpoints`)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.quality.config import Config, Search
from benchmarks.quality.records import CONDITIONS, PromptRuns, Results, Run
from benchmarks.stats import clustered, holm, spearman
from selection.stopping import budget_steps, step_threshold

PREREGISTRATION: dict[str, Any] = {
    "written": "into the results file before the first run; the summary reports exactly these",
    "unit": "per prompt, the difference A - B in bits per byte of the continuation (negative favours A)",
    "trained": "SIFT at its tuned rate with the chosen recipe, after the horizon's steps",
    "primary": [
        {"name": "trained_vs_base", "a": "sift", "b": "base", "group": "new_knowledge"},
        {"name": "trained_vs_icl_equal_docs", "a": "sift", "b": "icl_equal_docs", "group": "new_knowledge"},
    ],
    "secondary": [
        {"name": "sift_vs_nn_shared_lr", "a": "sift_shared", "b": "nn_shared", "group": "new_knowledge"},
        {"name": "adaptive_vs_uniform", "a": "adaptive", "b": "uniform", "group": "new_knowledge"},
        {"name": "contrast_trained_vs_base", "a": "sift", "b": "base", "group": "contrast"},
        {"name": "trained_vs_icl_520", "a": "sift", "b": "icl_sift", "group": "new_knowledge"},
        {"name": "trained_vs_icl_full_context", "a": "sift", "b": "icl_full_context", "group": "new_knowledge"},
    ],
    "alpha": 0.05,
    "correction": "Holm within each family (primary, secondary)",
    "test": "two-sided sign-flip permutation test over sources: each source's mean difference, every sign "
    "pattern enumerated (exact); the prompts of one source are not independent",
    "ci": "95% percentile bootstrap over sources (resample sources, keep their prompts), 10,000 resamples",
    "leave_one_source_out": "the mean difference with each source left out: its range, and whether the sign holds",
    "mde": "smallest mean difference detectable with 80% power at alpha 0.05: (z_0.975 + z_0.8) x the "
    "source-clustered standard error",
    "content": "every endpoint is also reported on content tokens (tokens with a letter), descriptively",
    "stopping_targets": {"adaptive_minus_uniform": "mean <= 0", "spearman_steps_gain": "> 0"},
}


def gain(run: Run, base: Run) -> float:
    """bpb gained over the base model (positive: better)."""
    return base.final.bpb - run.final.bpb


def choose_recipe(search: dict[str, PromptRuns], config: Search) -> dict[str, Any]:
    """Every recipe's mean gain and training seconds over the dev prompts, whether it is on the Pareto
    front (no other recipe gains more in less time), and the one with the most gain per second."""
    table: dict[str, dict[str, Any]] = {}
    for recipe in config.recipes():
        entries = [e for e in search.values() if recipe.name in e]
        g = statistics.mean(gain(e[recipe.name], e["base"]) for e in entries)
        seconds = statistics.mean(e[recipe.name].seconds or 0.0 for e in entries)
        table[recipe.name] = {
            "layers": str(recipe.layers),
            "rank": recipe.rank,
            "train_tokens": recipe.train_tokens,
            "n": len(entries),
            "gain": g,
            "seconds": seconds,
            "seconds_per_step": seconds / config.steps,
            "gain_per_second": g / seconds,
        }
    for row in table.values():
        row["pareto"] = not any(
            o is not row
            and o["gain"] >= row["gain"]
            and o["seconds"] <= row["seconds"]
            and (o["gain"] > row["gain"] or o["seconds"] < row["seconds"])
            for o in table.values()
        )
    best = max(table, key=lambda name: table[name]["gain_per_second"])
    chosen = {k: table[best][k] for k in ("layers", "rank", "train_tokens")}
    return {"steps": config.steps, "learning_rate": config.learning_rate, "table": table, "chosen": chosen}


def _pooled(runs: Sequence[Run]) -> float:
    return sum(r.final.bits for r in runs) / sum(r.final.bytes for r in runs)


def choose_rates(sweep: dict[str, PromptRuns], grids: dict[str, list[float]]) -> dict[str, Any]:
    """Per method, the pooled bpb of each rate over the dev prompts at the horizon and the best rate; with
    both methods, the shared rate: of the rates both grids hold, the one best for the two together."""
    out: dict[str, Any] = {}
    for method, grid in grids.items():
        bpb = {f"{lr:g}": _pooled([e[f"{method}@{lr:g}"] for e in sweep.values()]) for lr in grid}
        best = min(grid, key=lambda lr: bpb[f"{lr:g}"])
        out[method] = {"grid": grid, "bpb": bpb, "best": best, "interior": grid[0] < best < grid[-1]}
    if len(grids) == 2:
        a, b = (out[m] for m in grids)
        common = [lr for lr in a["grid"] if lr in b["grid"]]
        out["shared"] = min(common, key=lambda lr: a["bpb"][f"{lr:g}"] + b["bpb"][f"{lr:g}"])
    return out


def total_reduction(run: Run, steps: int) -> float:
    """V = 1 - sigma^2_K / sigma^2_0: how much of the prompt's uncertainty the first K picks remove."""
    assert run.sigma2 is not None
    k = min(steps, len(run.sigma2) - 1)
    return 1.0 - run.sigma2[k] / run.sigma2[0]


def marginal_steps(run: Run, min_gain: float, step_tokens: int, max_steps: int) -> int:
    """Steps the previous rule (stop once a pick removes less than `min_gain` per 1,000 tokens of the
    prompt's prior variance) takes on the run's variance trace."""
    assert run.sigma2 is not None
    threshold = step_threshold(min_gain, step_tokens) * run.sigma2[0]
    for n in range(1, min(max_steps, len(run.sigma2) - 1) + 1):
        if run.sigma2[n - 1] - run.sigma2[n] < threshold:
            return n - 1
    return min(max_steps, len(run.sigma2) - 1)


def _rule_table(runs: Sequence[Run], steps_of, grid: Sequence[float]) -> list[dict[str, Any]]:
    rows = []
    realised = [r.at(0) - r.final.bpb for r in runs]
    for t in grid:
        steps = [steps_of(r, t) for r in runs]
        rows.append(
            {
                "threshold": t,
                "mean_steps": statistics.mean(steps),
                "gain": statistics.mean(r.at(0) - r.at(n) for r, n in zip(runs, steps, strict=True)),
                "spearman": spearman(steps, realised)["rho"] if len(set(steps)) > 1 else None,
            }
        )
    return rows


def stopping(dev_runs: Sequence[Run], config: Config, train_tokens: int = 128) -> dict[str, Any]:
    """The gain-budget rule's threshold tau on dev prompts (the largest that keeps `keep_gain` of the
    horizon's gain), and the diagnosis of the previous, marginal rule on the same runs: how the steps each
    grants, the total variance reduction V and the realised gain rank together."""
    k = config.max_steps
    full = statistics.mean(r.at(0) - r.final.bpb for r in dev_runs)
    budget = _rule_table(dev_runs, lambda r, t: budget_steps(r.sigma2 or [], t, k), config.tau_grid)
    keeping = [row for row in budget if row["gain"] >= config.keep_gain * full]
    chosen = max(keeping, key=lambda row: row["threshold"]) if keeping and full > 0 else budget[0]
    marginal = _rule_table(
        dev_runs, lambda r, t: marginal_steps(r, t, train_tokens, k), tuple(float(x) for x in config.tau_grid)
    )
    twin = min(marginal, key=lambda row: abs(row["mean_steps"] - chosen["mean_steps"]))
    realised = [r.at(0) - r.final.bpb for r in dev_runs]
    v = [total_reduction(r, k) for r in dev_runs]
    twin_steps = [marginal_steps(r, twin["threshold"], train_tokens, k) for r in dev_runs]
    return {
        "rule": "gain_budget",
        "tau": chosen["threshold"],
        "full_gain": full,
        "n": len(dev_runs),
        "grid": budget,
        "diagnosis": {
            "spearman_v_gain": spearman(v, realised),
            "marginal_rule_at_equal_steps": twin,
            "spearman_marginal_steps_v": spearman(twin_steps, v) if len(set(twin_steps)) > 1 else None,
            "marginal_grid": marginal,
        },
    }


def _group(results: Results, name: str) -> dict[str, PromptRuns]:
    return {k: e for k, e in results.reported.items() if results.groups.get(e.domain) == name}


def _compare(entries: dict[str, PromptRuns], a: str, b: str, content: bool = False) -> dict[str, Any] | None:
    """The clustered comparison of conditions a and b (their final scores) where both ran."""
    both = [e for e in entries.values() if a in e and b in e]
    if len({e.domain for e in both}) < 2:
        return None

    def value(run: Run) -> float:
        return run.final.content_bpb if content and run.final.content_bpb is not None else run.final.bpb

    diffs = [value(e[a]) - value(e[b]) for e in both]
    return clustered(diffs, [e.domain for e in both]).as_dict()


def adaptive_vs_uniform(
    entries: dict[str, PromptRuns], steps_of: Callable[[Run], int], config: Config
) -> dict[str, Any] | None:
    """A stopping rule (`steps_of`: a SIFT run's steps under the rule) against uniform steps at the same
    mean, on SIFT's curves (interpolated between the scored checkpoints), and how its steps rank with the
    realised gain."""
    runs = {k: e for k, e in entries.items() if "sift" in e}
    if len({e.domain for e in runs.values()}) < 2:
        return None
    steps = {pid: steps_of(e["sift"]) for pid, e in runs.items()}
    mean_steps = statistics.mean(steps.values())
    diffs = [e["sift"].at(steps[pid]) - e["sift"].at(mean_steps) for pid, e in runs.items()]
    realised = [e["sift"].at(0) - e["sift"].final.bpb for e in runs.values()]
    test = clustered(diffs, [e.domain for e in runs.values()]).as_dict()
    return {
        **test,
        "mean_steps": mean_steps,
        "adaptive": statistics.mean(e["sift"].at(steps[pid]) for pid, e in runs.items()),
        "uniform": statistics.mean(e["sift"].at(mean_steps) for e in runs.values()),
        "spearman_steps_gain": spearman(list(steps.values()), realised) if len(set(steps.values())) > 1 else None,
        "spearman_v_gain": spearman([total_reduction(e["sift"], config.max_steps) for e in runs.values()], realised),
    }


def stopping_rules(results: Results, config: Config) -> dict[str, Callable[[Run], int]]:
    """The gain-budget rule at its calibrated tau, and the previous (marginal) rule at the threshold that
    gave the same mean steps on the dev prompts."""
    assert results.stopping is not None and results.recipe is not None
    k, tau = config.max_steps, results.stopping["tau"]
    twin = results.stopping["diagnosis"]["marginal_rule_at_equal_steps"]["threshold"]
    tokens = results.recipe["chosen"]["train_tokens"]
    return {
        "gain_budget": lambda run: budget_steps(run.sigma2 or [], tau, k),
        "marginal": lambda run: marginal_steps(run, twin, tokens, k),
    }


def endpoints(results: Results, config: Config) -> dict[str, Any]:
    """The pre-registered comparisons, each with its Holm-adjusted p within its family and a verdict."""
    assert results.stopping is not None
    out: dict[str, Any] = {}
    for family in ("primary", "secondary"):
        rows: dict[str, Any] = {}
        for spec in PREREGISTRATION[family]:
            entries = _group(results, spec["group"])
            if spec["name"] == "adaptive_vs_uniform":
                row = adaptive_vs_uniform(entries, stopping_rules(results, config)["gain_budget"], config)
            else:
                row = _compare(entries, spec["a"], spec["b"])
                if row is not None:
                    row["content"] = _compare(entries, spec["a"], spec["b"], content=True)
            if row is not None:
                rows[spec["name"]] = row
        adjusted = holm({name: row["p"] for name, row in rows.items()})
        for name, row in rows.items():
            row["p_holm"] = adjusted[name]
            row["significant"] = adjusted[name] < PREREGISTRATION["alpha"]
        out[family] = rows
    return out


def _per_domain(entries: dict[str, PromptRuns]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for domain in sorted({e.domain for e in entries.values()}):
        here = [e for e in entries.values() if e.domain == domain]
        for c in CONDITIONS:
            runs = [e[c] for e in here if c in e]
            if runs:
                table.setdefault(domain, {})[str(c)] = _pooled(runs)
    return table


def _curve(entries: dict[str, PromptRuns], steps: Sequence[int], condition: str = "sift") -> list[dict[str, float]]:
    """Mean bpb after each of `steps` over the prompts where `condition` ran."""
    runs = [e[condition] for e in entries.values() if condition in e]
    return [{"steps": n, "bpb": statistics.mean(r.at(n) for r in runs)} for n in steps] if runs else []


def costs(entries: dict[str, PromptRuns]) -> dict[str, dict[str, float]]:
    """Per condition, the mean training seconds (SIFT's horizon), extra prompt tokens and scoring seconds."""
    out = {}
    for c in CONDITIONS:
        runs = [e[c] for e in entries.values() if c in e]
        if runs:
            out[str(c)] = {
                "steps": statistics.mean(r.steps for r in runs),
                "train_seconds": statistics.mean(r.seconds or 0.0 for r in runs),
                "context_tokens": statistics.mean(r.final.context_tokens or 0 for r in runs),
                "context_documents": statistics.mean(r.final.context_documents or 0 for r in runs),
                "scoring_seconds": statistics.mean(r.final.seconds or 0.0 for r in runs),
            }
    return out


def summarise(results: Results, config: Config) -> dict[str, Any]:
    """The summary the README's tables and plots are made of."""
    assert results.lr is not None and results.stopping is not None and results.recipe is not None
    new, contrast = _group(results, "new_knowledge"), _group(results, "contrast")
    ends = endpoints(results, config)
    steps = sorted({0, *config.checkpoints, config.max_steps})
    return {
        "new_knowledge": {
            "n": len(new),
            "sources": sorted({e.domain for e in new.values()}),
            "trained_vs_base": ends["primary"].get("trained_vs_base"),
            "trained_vs_icl_equal_docs": ends["primary"].get("trained_vs_icl_equal_docs"),
            "sift_vs_nn_shared_lr": ends["secondary"].get("sift_vs_nn_shared_lr"),
            "per_source": _per_domain(new),
            "curve": _curve(new, steps),
            "curve_nn_shared": _curve(new, steps, "nn_shared"),
            "cost": costs(new),
        },
        "contrast": {
            "n": len(contrast),
            "domains": sorted({e.domain for e in contrast.values()}),
            "trained_vs_base": ends["secondary"].get("contrast_trained_vs_base"),
            "per_domain": _per_domain(contrast),
            "curve": _curve(contrast, steps),
        },
        "stopping": {
            "rule": results.stopping["rule"],
            "tau": results.stopping["tau"],
            "adaptive_vs_uniform": ends["secondary"].get("adaptive_vs_uniform"),
            "spearman_steps_gain": (ends["secondary"].get("adaptive_vs_uniform") or {}).get("spearman_steps_gain"),
            "marginal_rule": adaptive_vs_uniform(new, stopping_rules(results, config)["marginal"], config),
            "dev": results.stopping["diagnosis"],
        },
        "lr": {m: {"grid": results.lr[m]["grid"], "best": results.lr[m]["best"]} for m in ("sift", "nn")}
        | {"shared": results.lr["shared"]},
        "recipe": results.recipe["chosen"],
        "endpoints": ends,
        "n_prompts": len(results.reported),
        "per_domain": _per_domain(results.reported),
        "learning_rate": {m: results.lr[m]["best"] for m in ("sift", "nn")},
        "contamination": results.contamination,
    }
