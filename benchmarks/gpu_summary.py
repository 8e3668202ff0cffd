"""The one-screen summary of `benchmarks/gpu_check.sh`: each step's outcome and time, the test counts, and
the headline figures of the benchmarks it ran; printed, and saved as `summary.json` beside them.

Exit status 1 when a step failed, timed out or did not run, or, in the `gpu` mode, when a GPU test was
skipped (on a GPU machine with the whole `gpu` extra, every one of them must run).

    python -m benchmarks.gpu_summary OUT_DIR --mode gpu|offline|dry-run --limit-s 540
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

SKIPPED_RC = 75  # gpu_check.sh's exit status for a step its mode cannot run
TIMEOUT_RCS = (124, 137)
KEY_PACKAGES = ("torch", "vllm", "faiss-gpu", "ray", "transformers", "peft")


class Status(StrEnum):
    OK = "ok"
    FAILED = "failed"
    TIMEOUT = "timeout"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Step:
    name: str
    status: Status
    seconds: float
    note: str


def read_steps(path: Path) -> list[Step]:
    """steps.tsv: one line per step, `name <tab> exit status <tab> milliseconds <tab> note`."""
    steps = []
    for line in path.read_text().splitlines():
        name, rc, ms, note = (line.split("\t") + [""])[:4]
        code = int(rc)
        if code == 0:
            status = Status.OK
        elif code == SKIPPED_RC:
            status = Status.SKIPPED
        elif code in TIMEOUT_RCS:
            status = Status.TIMEOUT
        else:
            status = Status.FAILED
        steps.append(Step(name, status, int(ms) / 1000, note))
    return steps


def test_counts(junit: Path) -> dict[str, Any] | None:
    """Passed, failed, skipped (with reasons) from pytest's JUnit XML report."""
    if not junit.is_file():
        return None
    cases = ET.parse(junit).getroot().iter("testcase")
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "skip_reasons": []}
    for case in cases:
        if case.find("skipped") is not None:
            counts["skipped"] += 1
            counts["skip_reasons"].append(f"{case.get('name')}: {case.find('skipped').get('message', '')}")
        elif case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        else:
            counts["passed"] += 1
    return counts


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def resolution(report: dict) -> dict[str, Any]:
    """Versions pip resolved for the gpu extra (from `pip install --dry-run --report`)."""
    versions = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}
    return {"packages": len(versions), **{name: versions.get(name) for name in KEY_PACKAGES}}


def selection_figures(results: dict) -> dict[str, Any]:
    rows = results["retrieval_vs_sift"]
    return {
        "device": results["machine"].get("device"),
        "faiss_gpus": results["machine"].get("faiss_gpus"),
        "sift_over_retrieval": {
            f"{r['index_size']}@K{r['K']}": {
                "faiss_ms": r["faiss_s"] * 1e3,
                "sift_ms": r["sift_s"] * 1e3,
                "overhead": r["sift_overhead"],
                "overhead_16_prompts": r["sift_overhead_16"],
            }
            for r in rows
        },
        "batched_speedup": {f"K{r['K']}": r["speedup"] for r in results["batching"]},
    }


def trainer_figures(results: dict) -> dict[str, Any]:
    return {
        "matmul_peak_tflops": results["matmul_peak_flops"] / 1e12,
        "batches": {
            b: {"tokens_per_s": r["tokens_per_s"], "share_of_peak": r["share_of_peak"]}
            for b, r in results["batches"].items()
        },
        "peak_gpu_mb": results.get("peak_gpu_mb"),
    }


def latency_figures(results: dict) -> dict[str, Any]:
    figures: dict[str, Any] = {
        kind: {c: {"e2e_p50": r["e2e_p50"], "rps": r["rps"]} for c, r in results[kind].items()}
        for kind in ("adapted", "plain")
    }
    protocol = results.get("protocol_request")
    if protocol:
        figures["protocol_request"] = {k: protocol[k] for k in ("adaptation", "e2e", "steps", "timings")}
    return figures


def merge_figures(results: dict) -> dict[str, Any]:
    modes = {mode: {c: r["e2e_p50"] for c, r in rows.items()} for mode, rows in results["modes"].items()}
    return {"build_s": results["build"]["seconds"], "e2e_p50": modes, "targets": results["targets"]}


def summarise(out_dir: Path, mode: str, limit_s: float) -> dict[str, Any]:
    steps = read_steps(out_dir / "steps.tsv")
    summary: dict[str, Any] = {
        "mode": mode,
        "limit_s": limit_s,
        "total_s": sum(s.seconds for s in steps),
        "steps": [asdict(s) for s in steps],
        "tests": test_counts(out_dir / "gpu-tests.xml"),
    }
    figures = {
        "resolve": resolution,
        "selection_speed": selection_figures,
        "trainer_speed": trainer_figures,
        "latency": latency_figures,
        "merge_latency": merge_figures,
    }
    for name, extract in figures.items():
        results = _load(out_dir / f"{name}.json")
        if results is not None:
            summary[name] = extract(results)
    problems = [f"{s.name}: {s.status}" for s in steps if s.status in (Status.FAILED, Status.TIMEOUT)]
    if mode == "gpu" and summary["tests"] and summary["tests"]["skipped"]:
        problems.append(f"tests: {summary['tests']['skipped']} skipped on the GPU machine")
    summary["problems"] = problems
    return summary


def render(summary: dict[str, Any]) -> str:
    """The summary as about one screen of text."""
    lines = [f"sift-serve GPU check ({summary['mode']}): {summary['total_s']:.0f} s of {summary['limit_s']:.0f} s"]
    for s in summary["steps"]:
        lines.append(f"  {s['name']:<16} {s['status']:<8} {s['seconds']:7.1f} s  {s['note']}".rstrip())
    if tests := summary["tests"]:
        lines.append(f"tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped")
        lines += [f"  skipped {reason}" for reason in tests["skip_reasons"]]
    if r := summary.get("resolve"):
        lines.append("gpu extra resolves: " + ", ".join(f"{k} {v}" for k, v in r.items()))
    if sel := summary.get("selection_speed"):
        lines.append(f"selection on {sel['device']} (Faiss GPUs: {sel['faiss_gpus']}):")
        for key, r in sel["sift_over_retrieval"].items():
            lines.append(
                f"  {key:<14} faiss {r['faiss_ms']:8.2f} ms  SIFT {r['sift_ms']:7.2f} ms  "
                f"+{100 * r['overhead']:.0f}% (16 prompts batched: +{100 * r['overhead_16_prompts']:.0f}%)"
            )
    if tr := summary.get("trainer_speed"):
        row = ", ".join(
            f"batch {b}: {r['tokens_per_s']:.0f} tok/s ({100 * r['share_of_peak']:.1f}%)"
            for b, r in tr["batches"].items()
        )
        lines.append(f"trainer (matmul peak {tr['matmul_peak_tflops']:.1f} TFLOP/s): {row}")
    if lat := summary.get("latency"):
        for kind in ("adapted", "plain"):
            row = ", ".join(f"c={c}: {r['e2e_p50']:.2f} s" for c, r in lat[kind].items())
            lines.append(f"latency p50 {kind}: {row}")
        if p := lat.get("protocol_request"):
            stages = ", ".join(f"{k} {v:.1f}" for k, v in (p["timings"] or {}).items())
            lines.append(f"protocol request ({p['steps']} steps): {p['e2e']:.1f} s end to end ({stages})")
    if merge := summary.get("merge_latency"):
        for kind, row in merge["e2e_p50"].items():
            lines.append(f"merge latency p50 {kind}: " + ", ".join(f"c={c}: {v:.2f} s" for c, v in row.items()))
    lines.append("PROBLEMS: " + "; ".join(summary["problems"]) if summary["problems"] else "all steps passed")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--mode", choices=["gpu", "offline", "dry-run"], required=True)
    parser.add_argument("--limit-s", type=float, required=True)
    args = parser.parse_args()
    summary = summarise(args.out_dir, args.mode, args.limit_s)
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(render(summary))
    sys.exit(1 if summary["problems"] else 0)


if __name__ == "__main__":
    main()
