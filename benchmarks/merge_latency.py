"""What expert merging costs and saves: latency of `merge` requests beside plain, `train`, `merge+train` and
in-context (`context: prepend`) requests, all in one run of the Ray Serve application, and the time to
build the experts (the amortisation: after how many requests the build has paid for itself).

First builds E experts of S steps over the served index (as `sift-serve experts build` does, timed; in a
view of the index beside it, `<index>-experts-E/`, kept and reused on the next run), then starts the
application (the embedded default, or `--config`) on that view and, with the official `openai` client at
each concurrency, sends streamed chat requests in each mode. Reports
p50/p95 end-to-end latency and time to first token per mode, the stage breakdown, and:

- merge / plain, p50 at 1 client (target <= 1.5x on this CPU) and at the other concurrencies;
- merge / train and merge / prepend, p50;
- break-even requests: build seconds / (train p50 - merge p50) at 1 client.

The adapter cache is off for the run (the clients repeat a few prompts; the cache would answer the repeats
without training).

    python -m benchmarks.merge_latency [--config FILE] [--experts 64] [--steps 16] [--concurrency 1 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path

import openai

from adapters.expert_build import build_experts, plan_for
from adapters.experts import ExpertManifest, experts_dir
from benchmarks.latency import load, serve_locally
from benchmarks.merge_quality import index_view
from selection.build import ensure_default_index
from serving.config import Settings
from serving.services import index_dir, model_dir

MODES = {
    "plain": {"enabled": False},
    "merge": {"mode": "merge"},
    "train": {},
    "merge+train": {"mode": "merge+train"},
    "prepend": {"context": "prepend", "max_steps": 0},
}
"""Each mode's `adaptation` object (`train` and `merge+train` with the server's defaults)."""


def build(settings: Settings, experts: int, steps: int) -> dict:
    """E experts over the served index, in a view of it (`index_view`: the index itself stays as it was),
    built and timed unless a finished build of this plan is there; `settings` then serves the view."""
    if settings.index_path is None:
        ensure_default_index(settings.models, settings.index)
    view, model = index_view(index_dir(settings), experts), model_dir(settings)
    adaptation = settings.adaptation
    plan = plan_for(settings.trainer, experts, steps, adaptation.learning_rate, adaptation.max_train_tokens)
    manifest = experts_dir(view) / "manifest.json"
    fresh = not manifest.is_file() or ExpertManifest.read(manifest.parent).plan != plan
    started = time.monotonic()
    build_experts(view, model, settings.trainer, plan, overwrite=True)
    seconds = time.monotonic() - started
    settings.index_path = view
    return {"plan": plan.model_dump(), "seconds": seconds if fresh else None, "reused": not fresh}


def measure(url: str, modes: list[str], concurrencies: list[int], per_client: int, max_tokens: int) -> dict:
    model = openai.OpenAI(base_url=f"{url}/v1", api_key="unused").models.list().data[0].id

    def client() -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=900)

    for mode in modes:  # warm-up: each mode's first request loads what it needs
        asyncio.run(load(client(), model, 1, 1, max_tokens, MODES[mode]))
    results: dict = {mode: {} for mode in modes}
    for concurrency in concurrencies:
        for mode in modes:
            row = asyncio.run(load(client(), model, concurrency, per_client, max_tokens, MODES[mode]))
            results[mode][str(concurrency)] = row
            shown = {k: v for k, v in row.items() if k != "rows"}
            print(f"{mode:<12} c={concurrency:<3} {json.dumps(shown)}", flush=True)
    return results


def ratios(results: dict, build_seconds: float | None) -> dict:
    def p50(mode: str, c: str) -> float | None:
        return results.get(mode, {}).get(c, {}).get("e2e_p50")

    out: dict = {}
    for c in results["merge"]:
        merge = p50("merge", c)
        for other in ("plain", "train", "prepend", "merge+train"):
            if (value := p50(other, c)) is not None and merge is not None:
                out[f"merge_over_{other.replace('+', '_')}_p50_c{c}"] = merge / value
    saved = (p50("train", "1") or 0) - (p50("merge", "1") or 0)
    if build_seconds is not None and saved > 0:
        out["break_even_requests"] = build_seconds / saved
    out["target_merge_within_1_5x_plain_c1"] = out.get("merge_over_plain_p50_c1", float("inf")) <= 1.5
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="sift-serve settings to start the application with")
    parser.add_argument("--experts", type=int, default=64, help="E: experts built over the served index")
    parser.add_argument("--steps", type=int, default=16, help="S: training steps per expert")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=8322)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/merge-latency.json"))
    args = parser.parse_args()
    if "merge" not in args.modes:
        parser.error("--modes must include merge")
    settings = Settings.load(args.config)
    # Every client repeats the same few prompts: the adapter cache would answer repeats without training.
    settings.trainer.cache_bytes = 0
    results: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {
            "max_tokens": args.max_tokens,
            "requests_per_client": args.requests_per_client,
            "modes": {m: MODES[m] for m in args.modes},
            "config": str(args.config) if args.config else None,
        },
    }
    results["build"] = build(settings, args.experts, args.steps)
    if results["build"]["reused"] and args.out.is_file():  # the timing of the run that built them
        earlier = json.loads(args.out.read_text()).get("build", {})
        if earlier.get("plan") == results["build"]["plan"]:
            results["build"]["seconds"] = earlier.get("seconds")
    print(f"experts: {json.dumps(results['build'])}", flush=True)

    def run(url: str) -> dict:
        return measure(url, args.modes, args.concurrency, args.requests_per_client, args.max_tokens)

    results["modes"] = serve_locally(settings, args.port, run)
    results["targets"] = ratios(results["modes"], results["build"]["seconds"])
    print(json.dumps(results["targets"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
