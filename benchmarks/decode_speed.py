"""vLLM decode speed with and without a LoRA adapter, and where the adapter's time goes.

On the real default model through vLLM's engine alone (no Ray, no HTTP), greedy, `--tokens` tokens with
`ignore_eos`: decode tokens/s = (N - 1) / (t(N tokens) - t(1 token)), so prefill is left out; the median of
`--repeats` runs. Adapters are real: the project's own `Trainer` takes one step (256 tokens of a standard
library module) at rank 8 and rank 16 and exports PEFT adapters, written to disk as the Generator does.

Engine settings are what the server uses (`serving.engines.vllm_engine.engine_args`), in variants that could
be cheap wins: `max_loras` 4 (the default) against 1, and the engine's `max_lora_rank` equal to the adapter's
rank against a larger one. Each variant runs in its own subprocess (one engine per process).

The first variant also runs one adapted generation under cProfile (the engine core in this process,
`VLLM_ENABLE_V1_MULTIPROCESSING=0`) and reports the seconds spent inside vLLM's CPU LoRA wrapper
(`PunicaWrapperCPU`: the per-layer shrink and expand ops) against the whole generation.

    python -m benchmarks.decode_speed [--tokens 64] [--repeats 2] [--no-profile]
        (JSON in benchmarks/results/decode_speed.json)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROMPT = "Write a Python function that reads rows from a CSV file and returns them as dictionaries."
VARIANTS = [
    {"name": "default (max_loras 4, max_lora_rank 16)", "max_loras": 4, "engine_rank": 16, "adapters": [0, 8, 16]},
    {"name": "max_loras 1", "max_loras": 1, "engine_rank": 16, "adapters": [16]},
    {"name": "max_lora_rank 8 (= the adapter's)", "max_loras": 4, "engine_rank": 8, "adapters": [8]},
    {"name": "max_lora_rank 32 (above the adapter's)", "max_loras": 4, "engine_rank": 32, "adapters": [16]},
]


@dataclass
class Measured:
    """Decode speed of one engine variant, per adapter rank (0: no adapter)."""

    variant: str
    decode_tokens_per_s: dict[str, float] = field(default_factory=dict)
    add_lora_s: dict[str, float] = field(default_factory=dict)
    profile: dict | None = None


def make_adapters(out: Path, ranks: list[int]) -> dict[int, Path]:
    """One-step PEFT adapters of the given ranks from the project's trainer, on the default model."""
    from adapters.config import TrainerConfig
    from adapters.spec import TrainRequest, TrainSpec
    from adapters.trainer import Trainer
    from infra.config import default_cache_dir
    from infra.models import fetch_default_model
    from serving.config import AdaptationConfig

    model = fetch_default_model(default_cache_dir())
    text = (Path(sysconfig.get_paths()["stdlib"]) / "csv.py").read_text()
    paths = {}
    for rank in ranks:
        trainer = Trainer(model, TrainerConfig(rank=rank, lora_alpha=2.0 * rank))
        config = AdaptationConfig()
        spec = TrainSpec(1, config.learning_rate, config.max_train_tokens, config.time_budget_s, seed=0)
        adapter = trainer.train(TrainRequest((text,), spec)).adapter
        paths[rank] = adapter.write(out).path
    return paths


def _seconds(llm, tokens: int, lora) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    llm.generate([PROMPT], params, lora_request=lora, use_tqdm=False)
    return time.perf_counter() - started


def measure_variant(variant: dict, adapters: dict[int, str], tokens: int, repeats: int, profile: bool) -> Measured:
    """One engine with the variant's settings; decode tokens/s for each of its adapters (0: none)."""
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from infra.config import default_cache_dir
    from infra.models import fetch_default_model
    from serving.config import GeneratorConfig
    from serving.engines.vllm_engine import engine_args

    model = fetch_default_model(default_cache_dir())
    config = GeneratorConfig(max_model_len=512, max_loras=variant["max_loras"])
    args = engine_args(model, config, variant["engine_rank"], "cpu", config.max_model_len)
    keys = ("model", "dtype", "max_model_len", "enable_lora", "max_lora_rank", "max_loras", "max_cpu_loras")
    llm = LLM(**{key: getattr(args, key) for key in keys}, enforce_eager=True)
    result = Measured(variant["name"])
    for i, rank in enumerate(variant["adapters"]):
        lora = None
        if rank:
            lora = LoRARequest(f"r{rank}", i + 1, adapters[rank])
            started = time.perf_counter()
            llm.llm_engine.add_lora(lora)
            result.add_lora_s[str(rank)] = time.perf_counter() - started
        _seconds(llm, 4, lora)  # warm-up
        speeds = []
        for _ in range(repeats):
            first, whole = _seconds(llm, 1, lora), _seconds(llm, tokens, lora)
            speeds.append((tokens - 1) / (whole - first))
        result.decode_tokens_per_s[str(rank)] = statistics.median(speeds)
        print(f"{variant['name']}: rank {rank}: {result.decode_tokens_per_s[str(rank)]:.2f} tokens/s", flush=True)
    if profile:
        lora_id = variant["adapters"].index(16) + 1  # the id it was loaded under: no second load in the profile
        result.profile = profile_generation(llm, LoRARequest("r16", lora_id, adapters[16]), tokens)
    return result


def profile_generation(llm, lora, tokens: int) -> dict:
    """Seconds of one adapted generation inside vLLM's CPU LoRA wrapper against the whole generation, and
    the LoRA code's own (self) time by function."""
    profiler = cProfile.Profile()
    profiler.enable()
    whole = _seconds(llm, tokens, lora)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, function): (calls, primitive, self s, cumulative s, ...)}
    wrapper = [
        (calls, cumulative)
        for (file, _, function), (calls, _, _, cumulative, _) in stats.items()
        if file.endswith("punica_cpu.py") and function in ("add_lora_linear", "add_lora_logits", "add_lora_embedding")
    ]
    lora_s = sum(cumulative for _, cumulative in wrapper)
    inside = sorted(
        (
            (f"{Path(file).name}:{function}", own)
            for (file, _, function), (_, _, own, _, _) in stats.items()
            if "/vllm/lora/" in file
        ),
        key=lambda item: -item[1],
    )
    return {
        "generation_s": whole,
        "lora_wrapper_s": lora_s,
        "lora_share": lora_s / whole,
        "wrapper_calls": sum(calls for calls, _ in wrapper),
        "lora_self_seconds_top": dict(inside[:8]),
    }


def run(tokens: int = 64, repeats: int = 2, profile: bool = True) -> dict:
    """Every variant, each in its own subprocess; the results and the ratios that matter."""
    with tempfile.TemporaryDirectory() as directory:
        adapters = {rank: str(path) for rank, path in make_adapters(Path(directory), [8, 16]).items()}
        env = {
            **os.environ,
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        }
        results = []
        for i, variant in enumerate(VARIANTS):
            job = {"variant": variant, "adapters": adapters, "profile": profile and i == 0}
            command = [sys.executable, "-m", "benchmarks.decode_speed", "--one", json.dumps(job)]
            command += ["--tokens", str(tokens), "--repeats", str(repeats)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"variant {variant['name']!r} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(lines[-1][len("RESULT ") :]))
            print(json.dumps(results[-1]), flush=True)
    default = results[0]["decode_tokens_per_s"]
    summary = {
        "decode_tokens_per_s": default,
        "adapter_slowdown_r8": default["0"] / default["8"],
        "adapter_slowdown_r16": default["0"] / default["16"],
        "r16_max_loras_1_over_4": results[1]["decode_tokens_per_s"]["16"] / default["16"],
        "r8_engine_rank_8_over_16": results[2]["decode_tokens_per_s"]["8"] / default["8"],
        "r16_engine_rank_32_over_16": results[3]["decode_tokens_per_s"]["16"] / default["16"],
        "lora_share_of_adapted_generation": (results[0]["profile"] or {}).get("lora_share"),
    }
    return {
        "settings": {"tokens": tokens, "repeats": repeats, "prompt": PROMPT},
        "variants": results,
        "summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_speed.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a subprocess: one variant (JSON), its result printed
    args = parser.parse_args()
    if args.one:
        job = json.loads(args.one)
        adapters = {int(k): v for k, v in job["adapters"].items()}
        result = measure_variant(job["variant"], adapters, args.tokens, args.repeats, job["profile"])
        print("RESULT " + json.dumps(asdict(result)), flush=True)
        return
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    out |= run(args.tokens, args.repeats, not args.no_profile)
    print(json.dumps(out["summary"], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
