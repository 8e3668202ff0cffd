"""The benchmark's figures: gain against steps (new knowledge and contrast, beside in-context retrieval),
the recipe search's gain against seconds (its Pareto front), the learning-rate sweep, and the stopping
rule's steps against the gain they realised."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.quality.config import Config
from benchmarks.quality.records import Label, Results
from benchmarks.quality.statistics import stopping_rules


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, ax, out: Path) -> None:
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def curves(results: Results, summary: dict[str, Any], out: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    lines = (
        ("new_knowledge", "curve", "o-", "new knowledge: SIFT trained"),
        ("new_knowledge", "curve_nn_shared", "^:", "new knowledge: NN trained (shared rate)"),
        ("contrast", "curve", "s--", "contrast: SIFT trained"),
    )
    for group, key, style, label in lines:
        rows = summary[group].get(key)
        if rows:
            base = rows[0]["bpb"]
            ax.plot([r["steps"] for r in rows], [base - r["bpb"] for r in rows], style, label=label)
    new = [e for e in results.reported.values() if results.groups.get(e.domain) == "new_knowledge"]
    for label in (Label.ICL_EQUAL_DOCS, Label.ICL_SIFT, Label.ICL_FULL):
        done = [e for e in new if label in e]
        if done:
            mean = sum(e["base"].final.bpb - e[label].final.bpb for e in done) / len(done)
            ax.axhline(mean, linestyle=":", color="grey")
            ax.annotate(f"new knowledge: {label}", (0, mean), fontsize=7, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("training steps (one pick each)")
    ax.set_ylabel("bits per byte gained over the base model")
    _save(plt, fig, ax, out)


def pareto(recipe: dict[str, Any], out: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    table = recipe["table"]
    front = sorted((r for r in table.values() if r["pareto"]), key=lambda r: r["seconds"])
    ax.plot([r["seconds"] for r in front], [r["gain"] for r in front], "-", color="grey", label="Pareto front")
    chosen = recipe["chosen"]
    clusters: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in table.values():
        clusters.setdefault((r["layers"], r["train_tokens"]), []).append(r)
    for (layers, tokens), rows in clusters.items():
        ax.scatter([r["seconds"] for r in rows], [r["gain"] for r in rows], color="C0", zorder=3)
        top = max(rows, key=lambda r: r["gain"])
        text = f"{layers}, {tokens} tokens/step, rank " + "/".join(str(r["rank"]) for r in rows)
        ax.annotate(text, (top["seconds"], top["gain"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    default = next(r for r in table.values() if all(r[k] == chosen[k] for k in chosen))
    name = f"{chosen['layers']}/r{chosen['rank']}/{chosen['train_tokens']}t"
    ax.scatter([default["seconds"]], [default["gain"]], color="red", zorder=4, label=f"the default: {name}")
    ax.set_xlabel(f"training seconds for {recipe['steps']} steps on this CPU")
    ax.set_ylabel(f"bits per byte gained after {recipe['steps']} steps (dev prompts)")
    _save(plt, fig, ax, out)


def learning_rates(lr: dict[str, Any], out: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method in ("sift", "nn"):
        grid = lr[method]["grid"]
        ax.plot(
            grid, [lr[method]["bpb"][f"{x:g}"] for x in grid], "o-", label=f"{method} (best {lr[method]['best']:.2g})"
        )
    ax.axvline(lr["shared"], linestyle=":", color="grey", label=f"shared {lr['shared']:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("pooled bits per byte at the horizon (dev prompts)")
    _save(plt, fig, ax, out)


def stopping(results: Results, summary: dict[str, Any], config: Config, out: Path) -> None:
    """Steps granted against realised gain on the new-knowledge prompts: the gain-budget rule and the
    marginal rule at the same mean steps."""
    plt = _pyplot()
    assert results.stopping is not None
    new = [e for e in results.reported.values() if results.groups.get(e.domain) == "new_knowledge" and "sift" in e]
    if not new:
        return
    rules = stopping_rules(results, config)
    realised = [e["sift"].at(0) - e["sift"].final.bpb for e in new]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    budget = [rules["gain_budget"](e["sift"]) for e in new]
    marginal = [rules["marginal"](e["sift"]) for e in new]
    ax.scatter(budget, realised, label=f"gain budget (tau {results.stopping['tau']:.3g})")
    ax.scatter(marginal, realised, marker="x", label="marginal rule, same mean steps")
    ax.set_xlabel("steps granted")
    ax.set_ylabel(f"bits per byte gained after {config.max_steps} steps")
    _save(plt, fig, ax, out)


def plots(results: Results, summary: dict[str, Any], config: Config, out: Path, name: str) -> None:
    assert results.recipe is not None and results.lr is not None
    curves(results, summary, out / f"quality-{name}-curves.png")
    pareto(results.recipe, out / f"quality-{name}-pareto.png")
    learning_rates(results.lr, out / f"quality-{name}-lr.png")
    stopping(results, summary, config, out / f"quality-{name}-stopping.png")
