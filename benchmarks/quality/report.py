"""The summary as Markdown tables: bits per byte per condition and domain, then every paired test."""

from __future__ import annotations

from typing import Any


def markdown(summary: dict[str, Any]) -> str:
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
