"""The summary as Markdown: the pre-registered endpoints, bits per byte per source and condition, the
recipe search, the learning rates and the stopping rule."""

from __future__ import annotations

from typing import Any

from benchmarks.quality.records import CONDITIONS


def _endpoint(name: str, row: dict[str, Any]) -> str:
    content = row.get("content") or {}
    content_text = f"{content['mean']:+.4f}" if content else ""
    return (
        f"| {name} | {row['n']} ({row['clusters']}) | {row['mean']:+.4f} | [{row['ci'][0]:+.4f}, {row['ci'][1]:+.4f}] "
        f"| {row['p']:.3g} | {row['p_holm']:.3g} | {'yes' if row['significant'] else 'no'} "
        f"| [{row['loso_min']:+.4f}, {row['loso_max']:+.4f}] | {row['mde']:.4f} | {content_text} |"
    )


def _table(per: dict[str, dict[str, float]]) -> list[str]:
    conditions = [str(c) for c in CONDITIONS if any(str(c) in row for row in per.values())]
    lines = ["| source | " + " | ".join(conditions) + " |", "|---|" + "---|" * len(conditions)]
    for source, row in per.items():
        lines.append(f"| {source} | " + " | ".join(f"{row[c]:.3f}" if c in row else "" for c in conditions) + " |")
    return lines


def _rule_line(name: str, row: dict[str, Any] | None) -> str:
    if not row:
        return f"{name}: not run."
    rho = (row["spearman_steps_gain"] or {}).get("rho")
    return (
        f"{name}: {row['mean_steps']:.1f} mean steps, adaptive - uniform {row['mean']:+.4f} bpb "
        f"(CI [{row['ci'][0]:+.4f}, {row['ci'][1]:+.4f}], p {row['p']:.3g}); "
        f"Spearman(steps, gain) {'n/a' if rho is None else f'{rho:+.2f}'}."
    )


def _grid(rates: list[float]) -> str:
    return ", ".join(f"{r:.2g}" for r in rates)


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| endpoint | prompts (sources) | mean A - B (bpb) | 95% CI (sources) | p (sign flip) | p (Holm) "
        "| holds | leave one source out | MDE | content-token mean |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family in ("primary", "secondary"):
        for name, row in summary["endpoints"][family].items():
            lines.append(_endpoint(f"{family}: {name}", row))
    lines += ["", "New knowledge, pooled bits per byte of the continuation:", ""]
    lines += _table(summary["new_knowledge"]["per_source"])
    lines += ["", "Contrast domains:", ""]
    lines += _table(summary["contrast"]["per_domain"])
    stop = summary["stopping"]
    avu = stop["adaptive_vs_uniform"] or {}
    rho = (stop["spearman_steps_gain"] or {}).get("rho")
    lines += [
        "",
        f"Stopping: {stop['rule']} with tau {stop['tau']:.3g}; adaptive {avu.get('adaptive', float('nan')):.4f} "
        f"against uniform {avu.get('uniform', float('nan')):.4f} bpb at {avu.get('mean_steps', float('nan')):.1f} "
        f"mean steps; Spearman(steps, gain) {rho if rho is None else f'{rho:+.2f}'}.",
        _rule_line("the previous, marginal rule at the same mean steps on dev", stop.get("marginal_rule")),
        f"Learning rates: sift {summary['lr']['sift']['best']:.3g} (grid {_grid(summary['lr']['sift']['grid'])}), "
        f"nn {summary['lr']['nn']['best']:.3g} (grid {_grid(summary['lr']['nn']['grid'])}), "
        f"shared {summary['lr']['shared']:.3g}.",
        f"Recipe: {summary['recipe']}.",
    ]
    return "\n".join(lines) + "\n"
