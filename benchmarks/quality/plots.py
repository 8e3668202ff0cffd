"""The benchmark's figures: curves per domain (SIFT and NN against steps), the duplicate condition, bits
per byte against compute, and adaptive against uniform steps."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks.quality.config import Config
from benchmarks.quality.records import Results
from selection.rules import Method


def plots(results: Results, summary: dict[str, Any], config: Config, out: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reported = list(results.reported.values())
    domains = sorted({p.domain for p in reported})
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(domains) / cols), cols, figsize=(14, 6.5), squeeze=False)
    steps = (0, *config.checkpoints)
    for ax, domain in zip(axes.flat, domains, strict=False):
        rows = [p for p in reported if p.domain == domain]
        for m in (Method.SIFT, Method.NN):
            ax.plot(steps, [statistics.mean(p[m].at(s) for p in rows) for s in steps], marker="o", label=str(m))
        ax.set_title(f"{domain} ({len(rows)} prompts)", fontsize=9)
        ax.set_xlabel("steps", fontsize=8)
    for ax in list(axes.flat)[len(domains) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("bits per byte (continuation)")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"quality-{name}-curves.png", dpi=110)
    plt.close(fig)

    dup = list(results.duplicates.values())
    if dup:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        scored = [s for s in config.checkpoints if all(str(s) in (p[Method.NN].curve or {}) for p in dup)]
        dsteps = (0, *scored)
        for m in (Method.NN, Method.NN_F, Method.SIFT):
            ax.plot(dsteps, [statistics.mean(p[m].at(s) for p in dup) for s in dsteps], marker="o", label=str(m))
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
