"""Soak: a few hundred mixed requests at bounded concurrency against the Ray Serve application, then checks
that nothing was lost or leaked.

The load is locust's (headless, `benchmarks/soak_locustfile.py`): chat and completions, adapted and plain,
streamed and not, clients that hang up before, during and after training, invalid requests. Afterwards:
every request got an answer or a clean error (locust's failures, by class), no adapter directory is left on
disk and none is loaded in vLLM (the engine is asked), no replica was restarted, and each replica's resident
memory (with its child processes, e.g. vLLM's engine core) is flat after warm-up (the same load, run first
for `--warm-up-s`): start, peak and end are reported, and "flat" means end <= 1.25 x start.

    python -m benchmarks.soak [--config FILE] [--duration-s 600] [--users 8] [--out benchmarks/results/soak.json]

`tests/test_soak.py` runs a short version (90 s, 4 users) in CI.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.latency import serve_locally
from serving.config import Settings

APP = "sift-serve"
FLAT = 1.25  # end RSS at most this times the post-warm-up RSS
_REPLICA = re.compile(rf"ServeReplica:{APP}:(\w+)")


def process_rss(pattern: re.Pattern) -> dict[str, int]:
    """Resident bytes of the processes whose command line matches `pattern`, their children included, keyed by
    the pattern's first group (Ray names its worker processes after the actor they run)."""
    import psutil

    out: dict[str, int] = {}
    for process in psutil.process_iter(["cmdline"]):
        match = pattern.search(" ".join(process.info["cmdline"] or []))
        if not match:
            continue
        try:
            family = [process, *process.children(recursive=True)]
            out[match[1]] = out.get(match[1], 0) + sum(p.memory_info().rss for p in family)
        except psutil.Error:
            continue
    return out


def replica_rss() -> dict[str, int]:
    """Resident bytes of each replica of the application, by deployment."""
    return process_rss(_REPLICA)


def replica_names() -> set[str]:
    """The application's replica actors: a restarted replica comes back under a new name."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#" in a["name"]}


def engine_adapters() -> int:
    from ray import serve

    return serve.get_deployment_handle("Generator", app_name=APP).loaded_adapters.remote().result()


def run_locust(url: str, model: str, users: int, duration_s: int, workdir: Path) -> tuple[dict, list[dict]]:
    """Run the locust load; returns the aggregated stats row and the failures (one row per class)."""
    prefix = workdir / "soak"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(Path(__file__).with_name("soak_locustfile.py")),
            "--headless",
            "--users",
            str(users),
            "--spawn-rate",
            str(users),
            "--run-time",
            f"{duration_s}s",
            "--stop-timeout",
            "120",
            "--host",
            url,
            "--only-summary",
            "--csv",
            str(prefix),
            "--exit-code-on-error",
            "0",
            "--loglevel",
            "WARNING",
        ],
        env={**os.environ, "SOAK_MODEL": model},
        check=True,
        timeout=duration_s + 600,
    )
    with open(f"{prefix}_stats.csv") as f:
        rows = list(csv.DictReader(f))
    with open(f"{prefix}_failures.csv") as f:
        failures = [{"name": r["Name"], "error": r["Error"], "count": int(r["Occurrences"])} for r in csv.DictReader(f)]
    by_name = {r["Name"]: {"requests": int(r["Request Count"]), "failures": int(r["Failure Count"])} for r in rows}
    return by_name, failures


def soak(settings: Settings, users: int, duration_s: int, warm_up_s: int = 30, port: int = 8323) -> dict:
    """Start the application, load it, check it; returns the report (see the module docstring)."""
    adapters = settings.generator.adapter_dir
    if adapters is None:
        raise ValueError("set generator.adapter_dir, so that leaked adapter directories can be counted")

    def measure(url: str) -> dict:
        import openai

        model = openai.OpenAI(base_url=f"{url}/v1", api_key="unused").models.list().data[0].id
        with tempfile.TemporaryDirectory() as workdir:  # warm-up: the same load, so every cache has filled
            run_locust(url, model, users, warm_up_s, Path(workdir))
        names, start = replica_names(), replica_rss()
        peak = dict(start)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(2.0):
                for name, rss in replica_rss().items():
                    peak[name] = max(peak.get(name, 0), rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with tempfile.TemporaryDirectory() as workdir:
            started = time.monotonic()
            by_name, failures = run_locust(url, model, users, duration_s, Path(workdir))
            seconds = time.monotonic() - started
        done.set()
        sampler.join()
        deadline = time.monotonic() + 60  # hung-up requests finish their cleanup in the background
        while (engine_adapters() or list(adapters.iterdir())) and time.monotonic() < deadline:
            time.sleep(1)
        end = replica_rss()
        total = by_name.pop("Aggregated")
        memory = {
            name: {"start_mb": start[name] / 2**20, "peak_mb": peak[name] / 2**20, "end_mb": end.get(name, 0) / 2**20}
            for name in sorted(start)
        }
        report = {
            "users": users,
            "warm_up_s": warm_up_s,
            "duration_s": round(seconds, 1),
            "requests": total["requests"],
            "failures": total["failures"],
            "by_kind": by_name,
            "failure_classes": failures,
            "adapter_dirs_left": len(list(adapters.iterdir())),
            "engine_adapters_loaded": engine_adapters(),
            "replicas_restarted": sorted(names ^ replica_names()),
            "memory": memory,
        }
        report["checks"] = {
            "every_request_answered_or_cleanly_refused": total["failures"] == 0,
            "no_adapter_directory_left": report["adapter_dirs_left"] == 0,
            "no_adapter_loaded_in_the_engine": report["engine_adapters_loaded"] == 0,
            "no_replica_restarted": not report["replicas_restarted"],
            "memory_flat_after_warm_up": all(m["end_mb"] <= FLAT * m["start_mb"] for m in memory.values()),
        }
        return report

    return serve_locally(settings, port, measure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--users", type=int, default=8, help="concurrent clients")
    parser.add_argument("--duration-s", type=int, default=600)
    parser.add_argument("--warm-up-s", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    args = parser.parse_args()
    settings = Settings.load(args.config)
    with tempfile.TemporaryDirectory(prefix="soak-adapters-") as adapters:
        if settings.generator.adapter_dir is None:
            settings.generator.adapter_dir = Path(adapters)
        report = soak(settings, args.users, args.duration_s, args.warm_up_s)
    print(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    sys.exit(0 if all(report["checks"].values()) else 1)


if __name__ == "__main__":
    main()
