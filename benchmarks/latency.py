"""Latency and throughput of the running server, with and without test-time training, and of vLLM alone.

Starts the Ray Serve application on the embedded default (or `--config`), then with the official
`openai` async client at 1, 4 and 16 concurrent clients sends streamed chat requests (a) with test-time
training (the `adaptation` object) and (b) with `adaptation.enabled = false`; then shuts the server down
and runs (c) the same plain requests straight against a vLLM AsyncLLM with the same settings. Reports
end-to-end latency and time to first token (p50/p95), requests per second, the stage breakdown, and two
ratios:

- serving overhead of an adapted request: (end-to-end - select - train - generate) / end-to-end, at 1 client;
- plain request through the server / the same request on the engine directly (p50 latency, 1 client).

    python -m benchmarks.latency [--config FILE | --url URL] [--requests-per-client 2] [--max-tokens 32]
        [--protocol-request '{"max_steps": 50, "max_train_tokens": 1024, "min_gain": 0}'] [--decode]

`--decode` adds vLLM's decode speed without an adapter and with rank-8 and rank-16 adapters, and where the
adapter's time goes (`benchmarks.decode_speed`, which also runs alone).

`--protocol-request` adds, after the loads, one request alone with that adaptation object: the paper's
protocol (up to 50 steps of 1024 tokens) end to end, with its stage times and steps taken.

`--config` starts the application with those settings on this machine; `--url` measures a server that is
already running anywhere (a cluster: `serve deploy deploy/serve_config.yaml`), without the bare-engine part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import openai

from serving.config import Settings

PROMPTS = [
    "How do I read rows from a CSV file?",
    "How can I parse command line arguments?",
    "What is the easiest way to compress a file with gzip?",
    "How do I compute a SHA-256 hash of a string?",
    "How do I format a date as ISO 8601?",
    "How do I run a subprocess and capture its output?",
    "How can I walk a directory tree?",
    "How do I use a heap as a priority queue?",
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(rows: list[dict], wall: float) -> dict:
    e2e = [r["e2e"] for r in rows]
    first = [r["first_token"] for r in rows]
    out = {
        "requests": len(rows),
        "e2e_p50": pct(e2e, 0.5),
        "e2e_p95": pct(e2e, 0.95),
        "first_token_p50": pct(first, 0.5),
        "first_token_p95": pct(first, 0.95),
        "rps": len(rows) / wall,
    }
    stages = [r["timings"] for r in rows if r.get("timings")]
    if stages:
        out["stages_mean"] = {k: statistics.mean(s[k] for s in stages) for k in stages[0]}
        compute = [r["timings"]["select"] + r["timings"]["train"] + r["timings"]["generate"] for r in rows]
        out["machinery_share_mean"] = statistics.mean(
            (r["e2e"] - c) / r["e2e"] for r, c in zip(rows, compute, strict=True)
        )
        # The same without the wait for the (single, serial) trainer: what the serving layers themselves add.
        out["machinery_share_excl_queue_mean"] = statistics.mean(
            (r["e2e"] - c - r["timings"]["queue"]) / r["e2e"] for r, c in zip(rows, compute, strict=True)
        )
    out["rows"] = rows
    return out


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int, adaptation: dict) -> dict:
    started = time.perf_counter()
    first, timings, steps = None, None, None
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"adaptation": adaptation},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - started
        report = (chunk.model_extra or {}).get("adaptation")
        if report and "timings" in report:
            timings, steps = report["timings"], report.get("steps")
    e2e = time.perf_counter() - started
    return {"e2e": e2e, "first_token": first if first is not None else e2e, "timings": timings, "steps": steps}


async def load(client, model: str, concurrency: int, per_client: int, max_tokens: int, adaptation: dict) -> dict:
    async def worker(w: int) -> list[dict]:
        return [
            await one_request(client, model, PROMPTS[(w * per_client + i) % len(PROMPTS)], max_tokens, adaptation)
            for i in range(per_client)
        ]

    started = time.perf_counter()
    rows = [r for batch in await asyncio.gather(*(worker(w) for w in range(concurrency))) for r in batch]
    return summary(rows, time.perf_counter() - started)


async def direct_engine(settings: Settings, concurrencies: list[int], per_client: int, max_tokens: int) -> dict:
    """The same plain requests on a bare vLLM AsyncLLM (no Ray, no HTTP, no adapters)."""
    from transformers import AutoTokenizer

    from serving.contracts import GenerateRequest, Sampling
    from serving.engines.vllm_engine import VLLMGenerator
    from serving.services import model_dir

    model = model_dir(settings)
    tokenizer = AutoTokenizer.from_pretrained(model)
    generator = VLLMGenerator(model, settings.generator, settings.trainer.rank, settings.generator.device)
    results = {}
    try:
        for concurrency in concurrencies:

            async def worker(w: int) -> list[dict]:
                rows = []
                for i in range(per_client):
                    prompt = PROMPTS[(w * per_client + i) % len(PROMPTS)]
                    ids = tokenizer.apply_chat_template(
                        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
                    )
                    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
                    started, first = time.perf_counter(), None
                    sampling = Sampling(max_tokens=max_tokens, temperature=0)
                    request = GenerateRequest(f"direct-{w}-{i}", tuple(ids), sampling)
                    async for chunk in generator.generate(request):
                        if chunk.text and first is None:
                            first = time.perf_counter() - started
                    e2e = time.perf_counter() - started
                    rows.append({"e2e": e2e, "first_token": first if first is not None else e2e})
                return rows

            started = time.perf_counter()
            rows = [r for b in await asyncio.gather(*(worker(w) for w in range(concurrency))) for r in b]
            results[str(concurrency)] = summary(rows, time.perf_counter() - started)
            shown = {k: v for k, v in results[str(concurrency)].items() if k != "rows"}
            print(f"direct engine  c={concurrency:<3} {json.dumps(shown)}", flush=True)
    finally:
        generator.shutdown()
    return results


def load_server(
    url: str,
    concurrencies: list[int],
    per_client: int,
    max_tokens: int,
    adaptation: dict,
    protocol_request: dict | None = None,
) -> dict:
    """Adapted and plain streamed requests against the server at `url`, at each concurrency; then, with
    `protocol_request`, one request alone with that adaptation."""
    model = openai.OpenAI(base_url=f"{url}/v1", api_key="unused").models.list().data[0].id
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=900)
    asyncio.run(load(client, model, 1, 1, max_tokens, {"enabled": False}))  # warm-up
    results: dict = {"adapted": {}, "plain": {}}
    for concurrency in concurrencies:
        for kind, options in (("adapted", adaptation), ("plain", {"enabled": False})):
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=900)
            row = asyncio.run(load(client, model, concurrency, per_client, max_tokens, options))
            results[kind][str(concurrency)] = row
            shown = {k: v for k, v in row.items() if k != "rows"}
            print(f"server {kind:<7} c={concurrency:<3} {json.dumps(shown)}", flush=True)
    if protocol_request is not None:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=900)
        row = asyncio.run(one_request(client, model, PROMPTS[0], max_tokens, protocol_request))
        results["protocol_request"] = {"adaptation": protocol_request, **row}
        print(f"server protocol request {json.dumps(results['protocol_request'])}", flush=True)
    return results


def serve_locally(settings: Settings, port: int, run: Callable[[str], dict]) -> dict:
    """Start the Ray Serve application for `settings` on this machine, `run(url)`, shut everything down."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from selection.build import ensure_default_index
    from serving.deployments import build

    settings.server.port = port
    if settings.index_path is None:
        ensure_default_index(settings.models, settings.index)
    ray.init(num_cpus=settings.deploy.ray_num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(settings), name="sift-serve", route_prefix="/")
        return run(f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="sift-serve settings to start the application with")
    parser.add_argument("--url", help="measure a server that is already running (e.g. on a cluster) instead")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--adaptation", default='{"max_steps": 2, "max_train_tokens": 128}', help="adaptation object (JSON)"
    )
    parser.add_argument(
        "--protocol-request", help="adaptation object (JSON) for one more request, sent alone after the loads"
    )
    parser.add_argument("--no-direct", action="store_true", help="skip the bare-engine comparison")
    parser.add_argument(
        "--decode", action="store_true", help="also vLLM's decode tokens/s without and with adapters (decode_speed)"
    )
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latency.json"))
    args = parser.parse_args()
    settings = Settings.load(args.config)
    adaptation = json.loads(args.adaptation)
    protocol_request = json.loads(args.protocol_request) if args.protocol_request else None
    results: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {
            "max_tokens": args.max_tokens,
            "requests_per_client": args.requests_per_client,
            "adaptation": adaptation,
            "config": str(args.config) if args.config else None,
            "url": args.url,
        },
    }

    def run(url: str) -> dict:
        return load_server(
            url, args.concurrency, args.requests_per_client, args.max_tokens, adaptation, protocol_request
        )

    results |= run(args.url) if args.url else serve_locally(settings, args.port, run)
    one = str(args.concurrency[0])
    results["targets"] = {
        "adapted_machinery_share_c1": results["adapted"][one].get("machinery_share_mean"),
        "adapted_machinery_share_excl_queue": {
            c: r.get("machinery_share_excl_queue_mean") for c, r in results["adapted"].items()
        },
    }
    if not (args.no_direct or args.url):
        results["direct"] = asyncio.run(
            direct_engine(settings, args.concurrency, args.requests_per_client, args.max_tokens)
        )
        results["targets"]["plain_over_direct_p50_c1"] = (
            results["plain"][one]["e2e_p50"] / results["direct"][one]["e2e_p50"]
        )
    if args.decode:
        from benchmarks import decode_speed

        results["decode"] = decode_speed.run(args.max_tokens)
        results["targets"]["decode"] = results["decode"]["summary"]
    print(json.dumps(results["targets"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
