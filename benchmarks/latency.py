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

`--lora-decode` runs only vLLM's CPU LoRA path, no Ray and no server (JSON in
`benchmarks/results/lora_decode.json`), each engine variant in its own process with the engine core in it:

    python -m benchmarks.latency --lora-decode [--max-tokens 64] [--repeats 3]

Per step timed (`LLMEngine.step`), so decode tokens/s = 1 / the median decode step (prefill, the first step,
left out), which a busy, shared machine disturbs less than whole generations; no adapter and each adapter
interleaved within a repetition, ratios paired per repetition. Adapters are the project's: one `Trainer` step
(rank 8 and 16, all seven projections, `benchmarks.decode_speed.make_adapters`); each adapted generation adds
its adapter under a fresh id and removes it after, as the server does. Variants: the server's settings, then
`max_loras` 1, `max_lora_rank` equal to the adapter's rank or above it, `lora_target_modules` = the trainer's
projections, and LoRA off. The server-settings engine also measures a what-if (`lean_lora_switch`: vLLM's code
patched in the benchmark only) and profiles decode steps with torch.profiler (LoRA calls tagged: their share of
the step and the aten ops inside them).

`--protocol-request` adds, after the loads, one request alone with that adaptation object: the paper's
protocol (up to 50 steps of 1024 tokens) end to end, with its stage times and steps taken.

`--config` starts the application with those settings on this machine; `--url` measures a server that is
already running anywhere (a cluster: `serve deploy deploy/serve_config.yaml`), without the bare-engine part.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
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

    from serving.engines import Sampling
    from serving.engines.vllm_engine import VLLMGenerator
    from serving.services import model_dir

    model = model_dir(settings)
    tokenizer = AutoTokenizer.from_pretrained(model)
    generator = VLLMGenerator(model, settings.generator, settings.trainer.rank, settings.trainer.device)
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
                    async for chunk in generator.generate(f"direct-{w}-{i}", list(ids), sampling, None):
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


# vLLM's decode speed with and without a LoRA adapter (`--lora-decode`): no Ray, no server; each engine in its
# own worker process (engine core in process), driven line by line over stdin so engines can be interleaved.

LORA_PROMPT = "Write a Python function that reads rows from a CSV file and returns them as dictionaries."
LORA_VARIANTS: list[dict] = [
    {"name": "server settings (max_loras 4, max_lora_rank 16)", "max_loras": 4, "engine_rank": 16},
    {"name": "max_loras 1", "max_loras": 1, "engine_rank": 16, "adapters": [16]},
    {"name": "max_lora_rank 8 (the rank-8 adapter's own)", "max_loras": 4, "engine_rank": 8, "adapters": [8]},
    {"name": "max_lora_rank 32", "max_loras": 4, "engine_rank": 32, "adapters": [16]},
    {"name": "lora_target_modules: the trainer's", "max_loras": 4, "engine_rank": 16, "adapters": [16],
     "trainer_targets": True},
    {"name": "enable_lora False", "max_loras": 4, "engine_rank": 16, "adapters": [],
     "engine_args": {"enable_lora": False}},
]  # fmt: skip
# What the server-settings engine runs alone, interleaved: (adapter rank or 0, lean what-if, torch threads or 0).
LORA_REFERENCE_CONFIGS = [
    (0, False, 0), (8, False, 0), (16, False, 0),
    (0, True, 0), (8, True, 0), (16, True, 0),
    (0, False, 1), (16, False, 1),
]  # fmt: skip


def lean_lora_switch() -> Callable[[bool], None]:
    """Patch vLLM's `PunicaWrapperCPU` (in this process only) with a what-if path, off until the returned
    switch turns it on.

    Not vLLM's code and not the server's. When every token of a step uses one adapter slot, each projection
    slice becomes two matmuls on views of that slot's weights, `y[:, slice] += scale * (x @ A.T) @ B.T`
    (`torch.mm`, `addmm_`), instead of vLLM's `sgmv_*` ops, which V1 always uses on CPU (`is_prefill=True`):
    per slice a `repeat_interleave` of the indices, a copy of every token's weights (`weights[indices]`), an
    einsum and a strided add, after zeroed buffers per call. A step without an adapter skips the LoRA
    projections outright. A step that mixes slots keeps vLLM's path; so do the embedding and logits LoRA.
    The difference in speed is what the per-op overhead of vLLM's path costs, against the adapter's arithmetic.
    """
    import torch
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    stock_linear, stock_update = PunicaWrapperCPU.add_lora_linear, PunicaWrapperCPU.update_metadata
    state = {"on": False}

    def update_metadata(self, mapping, *args, **kwargs) -> None:
        stock_update(self, mapping, *args, **kwargs)
        slots = torch.unique(self.token_lora_indices) if state["on"] else None
        self.lean_slot = int(slots[0]) if slots is not None and slots.numel() == 1 else None

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs) -> None:
        slot = getattr(self, "lean_slot", None) if state["on"] else None
        if slot is None:
            return stock_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs)
        if slot >= 0:  # -1: no adapter in this step
            x2, y2, offset = x.view(-1, x.shape[-1]), y.view(-1, y.shape[-1]), 0
            for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
                y2[:, offset : offset + size].addmm_(torch.mm(x2, a[slot, 0].t()), b[slot, 0].t(), alpha=scale)
                offset += size
        return None

    PunicaWrapperCPU.update_metadata = update_metadata
    PunicaWrapperCPU.add_lora_linear = add_lora_linear
    return lambda on: state.update(on=on)


def tag_lora_calls() -> None:
    """Wrap each of `PunicaWrapperCPU`'s entry points (as they are now) in a profiler range `lora::NAME`."""
    import functools

    from torch.profiler import record_function
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    for name in ("add_lora_linear", "add_lora_logits", "add_lora_embedding"):
        inner = getattr(PunicaWrapperCPU, name)

        def tagged(*args, _inner=inner, _label=f"lora::{name}", **kwargs):
            with record_function(_label):
                return _inner(*args, **kwargs)

        setattr(PunicaWrapperCPU, name, functools.wraps(inner)(tagged))


def profile_breakdown(events, step_s: list[float]) -> dict:
    """From torch.profiler's events over decode steps that took `step_s`: the share of the steps spent in the
    tagged LoRA calls, per entry point, the aten ops run per step (all, and inside the LoRA calls) and the
    LoRA calls' top aten ops by self time. Per step: medians would need per-step events, so these are means."""
    inside_lora: dict[str, float] = defaultdict(float)
    per_call: dict[str, float] = defaultdict(float)
    ops_in_lora, ops_all = 0, 0
    for event in events:
        if event.name.startswith("lora::"):
            per_call[event.name] += event.cpu_time_total / 1e6
            continue
        if not event.name.startswith("aten::"):
            continue
        ops_all += 1
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("lora::"):
            parent = parent.cpu_parent
        if parent is not None:
            ops_in_lora += 1
            inside_lora[event.name] += event.self_cpu_time_total / 1e6
    steps, wall = len(step_s), sum(step_s)
    top = sorted(inside_lora.items(), key=lambda item: -item[1])[:8]
    return {
        "profiled_steps": steps,
        "step_s_median_profiled": statistics.median(step_s),
        "lora_share": sum(per_call.values()) / wall,
        "lora_s_per_step": {name: s / steps for name, s in sorted(per_call.items())},
        "aten_ops_per_step": ops_all / steps,
        "aten_ops_per_step_in_lora": ops_in_lora / steps,
        "lora_self_s_per_step_top": {name: s / steps for name, s in top},
    }


def lora_worker(variant: dict, adapters: dict[int, str], tokens: int) -> None:
    """One engine with the variant's settings (`engine_args`, as the server builds them), in this process.
    Prints `READY`, then for each JSON line on stdin, `{"rank": R, "lean": L, "threads": T, "profile": P}`,
    generates greedily `tokens` tokens (adapter of rank R or none; adding it under a fresh id and removing it
    after, as the server does; through the lean what-if; with T torch threads instead of the engine's; the
    decode steps after the first under torch.profiler) and prints `RESULT` and the measurements as JSON."""
    import torch
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.llm_engine import LLMEngine

    from adapters.config import TrainerConfig
    from infra.config import default_cache_dir
    from infra.models import fetch_default_model
    from serving.config import GeneratorConfig
    from serving.engines.vllm_engine import engine_args

    model = fetch_default_model(default_cache_dir())
    extra = dict(variant.get("engine_args", {}))
    if variant.get("trainer_targets"):  # the engine wraps only the modules the trainer's adapters have
        extra["lora_target_modules"] = list(TrainerConfig().target_modules)
    config = GeneratorConfig(max_model_len=512, max_loras=variant["max_loras"], engine_args=extra)
    started = time.perf_counter()
    engine = LLMEngine.from_engine_args(engine_args(model, config, variant["engine_rank"], "cpu", 512))
    start_s = time.perf_counter() - started
    switch = lean_lora_switch() if engine.vllm_config.lora_config is not None else None
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    ids, threads, tagged = itertools.count(1), torch.get_num_threads(), False
    print("READY " + json.dumps({"engine_start_s": start_s, "torch_threads": threads}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        row: dict = {}
        if command.get("profile") and not tagged:
            tag_lora_calls()
            tagged = True
        lora = None
        if command["rank"]:
            lora_id = next(ids)
            lora = LoRARequest(f"r{command['rank']}-{lora_id}", lora_id, adapters[command["rank"]])
            started = time.perf_counter()
            engine.add_lora(lora)
            row["add_lora_s"] = time.perf_counter() - started
        if switch is not None:
            switch(command["lean"])
        torch.set_num_threads(command["threads"] or threads)
        engine.add_request(f"request-{next(ids)}", LORA_PROMPT, params, lora_request=lora)
        steps, token_ids, profiler = [], [], None
        while engine.has_unfinished_requests():
            if command.get("profile") and len(steps) == 1:
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                profiler.__enter__()
            started = time.perf_counter()
            for out in engine.step():
                if out.finished:
                    token_ids = list(out.outputs[0].token_ids)
            steps.append(time.perf_counter() - started)
        if profiler is not None:
            profiler.__exit__(None, None, None)
            row["profile"] = profile_breakdown(profiler.events(), steps[1:])
        torch.set_num_threads(threads)
        if lora is not None:
            started = time.perf_counter()
            engine.remove_lora(lora.lora_int_id)
            row["remove_lora_s"] = time.perf_counter() - started
        decode = sorted(steps[1:])
        row |= {
            "first_step_s": steps[0],
            "decode_step_s": statistics.median(decode),
            "decode_step_s_p90": decode[int(0.9 * (len(decode) - 1))],
            "decode_tokens_per_s": 1 / statistics.median(decode),
            "decode_tokens_per_s_mean": len(decode) / sum(decode),
            "token_ids": token_ids,
        }
        print("RESULT " + json.dumps(row), flush=True)


class LoraWorker:
    """A `lora_worker` subprocess: `run(rank, lean, threads)` -> that generation's measurements."""

    def __init__(self, variant: dict, adapters: dict[int, str], tokens: int, env: dict[str, str]) -> None:
        job = json.dumps({"variant": variant, "adapters": adapters, "tokens": tokens})
        self.name = variant["name"]
        self.log = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, "-m", "benchmarks.latency", "--lora-worker", job]
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        self.ready = json.loads(self._line("READY "))

    def _line(self, prefix: str) -> str:
        for line in self.process.stdout:
            if line.startswith(prefix):
                return line.removeprefix(prefix)
        self.log.seek(0)
        raise RuntimeError(f"lora worker {self.name!r} ended:\n{self.log.read()[-3000:]}")

    def run(self, rank: int, lean: bool = False, threads: int = 0, profile: bool = False) -> dict:
        command = {"rank": rank, "lean": lean, "threads": threads, "profile": profile}
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return json.loads(self._line("RESULT "))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.log.close()


def config_label(rank: int, lean: bool, threads: int) -> str:
    return ("none" if not rank else f"r{rank}") + (" lean" if lean else "") + (f" threads {threads}" if threads else "")


def paired(rows: list[dict], base: list[dict]) -> float:
    """Median over repetitions of decode step time of `rows` over that of `base` (above 1: slower)."""
    return statistics.median(r["decode_step_s"] / b["decode_step_s"] for r, b in zip(rows, base, strict=True))


def medians(rows: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in rows) for key in rows[0] if isinstance(rows[0][key], float)}


def lora_decode(tokens: int = 64, repeats: int = 3, variants: list[int] | None = None) -> dict:
    """The server-settings engine alone (`LORA_REFERENCE_CONFIGS`, interleaved, then one profiled generation
    per kind), and each other `LORA_VARIANTS` entry interleaved with it, generation by generation, so every
    ratio compares two engines under the same moment's load. Adapters: one step of the project's trainer."""
    from benchmarks.decode_speed import make_adapters

    variants = list(range(len(LORA_VARIANTS))) if variants is None else variants
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    out: dict = {"settings": {"tokens": tokens, "repeats": repeats, "prompt": LORA_PROMPT}, "variants": {}}
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        adapters = {rank: str(path) for rank, path in make_adapters(Path(directory), [8, 16]).items()}
        print(f"adapters (one trainer step, rank 8 and 16): {time.perf_counter() - started:.1f} s", flush=True)
        reference = LoraWorker(LORA_VARIANTS[0], adapters, tokens, env)
        out["settings"] |= {"omp_num_threads": env["OMP_NUM_THREADS"], **reference.ready}
        try:
            if 0 in variants:
                out["reference"] = lora_reference(reference, repeats)
            for index in variants:
                if index:
                    out["variants"][LORA_VARIANTS[index]["name"]] = lora_variant(
                        reference, LORA_VARIANTS[index], adapters, tokens, repeats, env
                    )
        finally:
            reference.close()
    out["summary"] = lora_summary(out)
    return out


def lora_reference(reference: LoraWorker, repeats: int) -> dict:
    """The server-settings engine: every reference configuration, interleaved per repetition; then one
    profiled generation without an adapter, with the rank-16 one, and with it through the lean what-if."""
    for config in LORA_REFERENCE_CONFIGS:  # warm-up
        reference.run(*config)
    runs: dict[str, list[dict]] = defaultdict(list)
    for _ in range(repeats):
        for config in LORA_REFERENCE_CONFIGS:
            runs[config_label(*config)].append(reference.run(*config))
    configs = {}
    for label, rows in runs.items():
        row = medians(rows)
        base = label.replace("r8", "none").replace("r16", "none").replace(" lean", "")
        if base != label:
            row["slowdown_vs_" + base.replace(" ", "_")] = paired(rows, runs[base])
        if " lean" in label:
            stock = runs[label.replace(" lean", "")]
            row["speedup_vs_stock"] = 1 / paired(rows, stock)
            row["same_tokens_as_stock"] = all(
                r["token_ids"] == s["token_ids"] for r, s in zip(rows, stock, strict=True)
            )
        configs[label] = row
        print(f"{reference.name}: {label}: {json.dumps(row)}", flush=True)
    profile = {
        config_label(*c): reference.run(*c, profile=True)["profile"]
        for c in ((0, False, 0), (16, False, 0), (16, True, 0))
    }
    print(f"{reference.name}: profile: {json.dumps(profile)}", flush=True)
    return {"configs": configs, "profile": profile}


def lora_variant(
    reference: LoraWorker, variant: dict, adapters: dict[int, str], tokens: int, repeats: int, env: dict[str, str]
) -> dict:
    """The variant's engine against the reference's, generation by generation (order alternating), without an
    adapter and with each of the variant's adapters."""
    worker = LoraWorker(variant, adapters, tokens, env)
    try:
        configs = [0] + list(variant["adapters"])
        for rank in configs:  # warm-up
            worker.run(rank)
            reference.run(rank)
        pairs: dict[str, tuple[list[dict], list[dict]]] = {config_label(r, False, 0): ([], []) for r in configs}
        for repeat in range(repeats):
            for rank in configs:
                mine, theirs = pairs[config_label(rank, False, 0)]
                first, second = (worker, reference) if repeat % 2 == 0 else (reference, worker)
                one, two = first.run(rank), second.run(rank)
                mine.append(one if first is worker else two)
                theirs.append(two if first is worker else one)
        result = {"engine_start_s": worker.ready["engine_start_s"], "configs": {}}
        for label, (mine, theirs) in pairs.items():
            row = medians(mine) | {"over_reference": paired(mine, theirs), "reference": medians(theirs)}
            if label != "none":
                row["slowdown_vs_none"] = paired(mine, pairs["none"][0])
                row["reference_slowdown_vs_none"] = paired(theirs, pairs["none"][1])
            result["configs"][label] = row
            print(f"{variant['name']}: {label}: {json.dumps(row)}", flush=True)
        return result
    finally:
        worker.close()


def lora_summary(out: dict) -> dict:
    """The ratios that answer the issue."""
    summary: dict = {}
    if "reference" in out:
        configs = out["reference"]["configs"]
        summary["decode_tokens_per_s"] = {label: row["decode_tokens_per_s"] for label, row in configs.items()}
        summary["adapter_slowdown"] = {label: configs[label]["slowdown_vs_none"] for label in ("r8", "r16")}
        summary["lean_speedup_vs_stock"] = {
            label: row["speedup_vs_stock"] for label, row in configs.items() if "speedup_vs_stock" in row
        }
        summary["lean_same_tokens"] = all(row.get("same_tokens_as_stock", True) for row in configs.values())
        summary["threads_1_over_2_step_time"] = {
            label: configs[f"{label} threads 1"]["decode_step_s"] / configs[label]["decode_step_s"]
            for label in ("none", "r16")
        }
        summary["add_lora_s"] = {label: configs[label]["add_lora_s"] for label in ("r8", "r16")}
        summary["lora_share_by_subtraction_r16"] = 1 - 1 / configs["r16"]["slowdown_vs_none"]
        summary["lora_share_profiled"] = {label: p["lora_share"] for label, p in out["reference"]["profile"].items()}
    summary["variant_step_time_over_reference"] = {
        name: {label: row["over_reference"] for label, row in result["configs"].items()}
        for name, result in out["variants"].items()
    }
    return summary


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
    ray.init(num_cpus=settings.server.ray_num_cpus, include_dashboard=False, log_to_driver=False)
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
    parser.add_argument("--max-tokens", type=int, help="new tokens per request (default 32; --lora-decode: 64)")
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
    parser.add_argument(
        "--lora-decode", action="store_true", help="only vLLM's decode speed with and without LoRA adapters, no server"
    )
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per configuration (--lora-decode)")
    parser.add_argument(
        "--lora-variants", type=int, nargs="+", help="LORA_VARIANTS indices to run (--lora-decode; default all)"
    )
    parser.add_argument("--lora-worker", help=argparse.SUPPRESS)  # a subprocess of --lora-decode: one engine
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument("--out", type=Path, help="JSON results (default: benchmarks/results/latency.json)")
    args = parser.parse_args()
    if args.lora_worker:
        job = json.loads(args.lora_worker)
        lora_worker(job["variant"], {int(rank): path for rank, path in job["adapters"].items()}, job["tokens"])
        return
    if args.lora_decode:
        results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
        results |= lora_decode(args.max_tokens or 64, args.repeats, args.lora_variants)
        print(json.dumps(results["summary"], indent=2))
        out = args.out or Path("benchmarks/results/lora_decode.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
        return
    args.out = args.out or Path("benchmarks/results/latency.json")
    args.max_tokens = args.max_tokens or 32
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
