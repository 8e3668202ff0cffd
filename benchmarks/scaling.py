"""The cluster machinery on one machine: the same load with 1 and 2 replicas of the Ingress and Selector, and
with the index whole and in 2 shards (one Shard deployment each).

On a 2-core machine extra replicas cannot add compute; what this shows is that the machinery holds (every
request answered, none lost) and what it costs against the single-replica, unsharded path: requests per
second and p50/p95 latency at 1, 4 and 16 concurrent clients, adapted and plain, and their ratios to the
first configuration. Each configuration starts the Ray Serve application afresh (`benchmarks.latency`).

    python -m benchmarks.scaling [--config FILE] [--out benchmarks/results/scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from benchmarks.latency import load_server, serve_locally
from selection.build import default_index_dir, ensure_default_index
from selection.shards import split_index
from serving.config import Settings

CONFIGS = [
    ("1 replica, whole index", 1, 1),
    ("2 replicas, whole index", 2, 1),
    ("1 replica, 2 shards", 1, 2),
    ("2 replicas, 2 shards", 2, 2),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--adaptation", default='{"max_steps": 1, "max_train_tokens": 64}')
    parser.add_argument("--port", type=int, default=8322)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling.json"))
    args = parser.parse_args()
    base = Settings.load(args.config)
    whole = base.index_path or ensure_default_index(base.models, base.index)
    sharded = default_index_dir(base.models).with_name(Path(whole).name + "-2shards")
    if not (sharded / "manifest.json").is_file():
        split_index(Path(whole), sharded, 2)
    adaptation = json.loads(args.adaptation)
    results: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {
            "requests_per_client": args.requests_per_client,
            "max_tokens": args.max_tokens,
            "adaptation": adaptation,
            "ray_logical_cpus": 4,
        },
        "configs": {},
    }
    for name, replicas, shards in CONFIGS:
        settings = base.model_copy(deep=True)
        settings.index_path = Path(whole) if shards == 1 else sharded
        settings.deploy.ray_num_cpus = 4  # logical: every configuration fits, the 2 physical cores are shared
        settings.deploy.ingress.replicas = settings.deploy.selector.replicas = replicas
        print(f"== {name}", flush=True)

        def run(url: str) -> dict:
            return load_server(url, args.concurrency, args.requests_per_client, args.max_tokens, adaptation)

        results["configs"][name] = serve_locally(settings, args.port, run)
    first = results["configs"][CONFIGS[0][0]]
    ratios: dict = {}
    for name, _, _ in CONFIGS[1:]:
        this = results["configs"][name]
        ratios[name] = {
            kind: {
                c: {
                    "rps": this[kind][c]["rps"] / first[kind][c]["rps"],
                    "e2e_p50": this[kind][c]["e2e_p50"] / first[kind][c]["e2e_p50"],
                    "e2e_p95": this[kind][c]["e2e_p95"] / first[kind][c]["e2e_p95"],
                }
                for c in first[kind]
            }
            for kind in ("adapted", "plain")
        }
    results["ratios_to_first"] = ratios
    results["requests_answered"] = {
        name: sum(r["requests"] for kind in ("adapted", "plain") for r in cfg[kind].values())
        for name, cfg in results["configs"].items()
    }
    print(json.dumps({"ratios_to_first": ratios, "requests_answered": results["requests_answered"]}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
