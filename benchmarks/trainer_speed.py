"""Trainer speed: training throughput at batch 1, 2, 4, 8 against the serial trainer, achieved FLOP/s
against the machine's measured matmul peak, per-step overhead against a bare peft loop, export time.

In one run:
- matmul peak: a large float32 `torch.matmul` (or bf16 on a GPU), timed; 2 n^3 flops each;
- the same R requests (S steps each, real text, `--tokens` per step) submitted at once to a trainer with
  `max_batch` = 1 (the serial trainer), 2, 4 and 8: tokens/s and requests/s of the whole wave, and the
  achieved FLOP/s of training, counted as 4 x (matmul parameters) x tokens (frozen base: forward 2,
  backward to the activations 2; the LoRA and attention terms are left out, so this is a lower bound);
- batch 1 against a bare hand-written peft loop over the same windows (overhead of the machinery);
- adapter export to bytes (median, max of 20), and writing those bytes as a PEFT directory.

    python -m benchmarks.trainer_speed [--tokens 256] [--steps 4] [--requests 8] [--batches 1 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import torch

from adapters.config import TrainerConfig
from adapters.spec import TrainRequest, TrainSpec
from adapters.trainer import Trainer
from infra.config import default_cache_dir
from infra.models import resolve_model
from serving.config import AdaptationConfig

FILES = ["csv.py", "heapq.py", "bisect.py", "fnmatch.py", "glob.py", "shlex.py", "textwrap.py", "string.py"]


def documents(count: int) -> list[str]:
    """Real text: standard-library modules, cut at different offsets so no two windows are the same."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / FILES[i % len(FILES)]).read_text() for i in range(count)]
    return [text[((i // len(FILES)) * 3000) % (len(text) // 2) :][:20_000] for i, text in enumerate(texts)]


def matmul_peak(device: str, dtype: torch.dtype, repeats: int = 5) -> float:
    """Measured FLOP/s of one large matmul on this device (best of `repeats` after a warm-up): n = 2048 on a
    CPU, 8192 on a GPU, where smaller products are too short to reach the peak."""
    cuda = device.startswith("cuda")
    n = 8192 if cuda else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def matmul_parameters(model: torch.nn.Module) -> int:
    """Weights that take part in matrix products per token (every linear layer, lm_head included)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def wave(trainer: Trainer, requests: list[TrainRequest]) -> dict:
    """Submit all requests at once; wall time, tokens and per-request queue times."""
    results = [None] * len(requests)

    def run(i: int) -> None:
        results[i] = trainer.train(requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r.tokens for r in results)
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(requests) / wall,
        "queue_s_mean": statistics.mean(r.queue_seconds for r in results),
    }


def bare_loop(
    model_dir: Path, config: TrainerConfig, spec: TrainSpec, windows: list[torch.Tensor], dtype: torch.dtype
) -> float:
    """Seconds per step of the plainest peft loop (one window per step) over the same windows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(config.device)
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, target_modules=list(config.target_modules))
    model = get_peft_model(base, lora).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, eps=1e-8)
    times = []
    for ids in [windows[0]] + windows:  # the first is a warm-up
        start = time.perf_counter()
        model(input_ids=ids[None], labels=ids[None]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256, help="max_train_tokens per step")
    parser.add_argument("--steps", type=int, default=4, help="steps per request")
    parser.add_argument("--requests", type=int, default=8, help="requests per wave")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/trainer_speed.json"))
    args = parser.parse_args()

    model_dir = resolve_model(args.model, default_cache_dir())
    docs = documents(args.requests * args.steps)
    base = TrainerConfig(device=args.device)
    rate = AdaptationConfig().learning_rate  # the server's default
    spec = TrainSpec(args.steps, rate, args.tokens, time_budget_s=None, seed=base.seed)
    requests = [TrainRequest(tuple(docs[i * args.steps : (i + 1) * args.steps]), spec) for i in range(args.requests)]
    results: dict = {
        "machine": {"platform": platform.platform(), "device": args.device, "threads": torch.get_num_threads()},
        "settings": {**vars(args), "out": str(args.out), "model": str(model_dir), "rank": base.rank},
        "batches": {},
    }
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    results["matmul_peak_flops"] = peak = matmul_peak(args.device, dtype)
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    for batch in args.batches:
        trainer = Trainer(model_dir, base.model_copy(update={"max_batch": batch}))
        flops_per_token = 4 * matmul_parameters(trainer.step.model)
        trainer.train(TrainRequest(tuple(docs[:1]), spec))  # warm-up
        row = wave(trainer, requests)
        row["achieved_flops"] = flops_per_token * row["tokens_per_s"]
        row["share_of_peak"] = row["achieved_flops"] / peak
        results["batches"][str(batch)] = row
        print(
            f"max_batch {batch}: {row['tokens_per_s']:.0f} tokens/s, {row['requests_per_s']:.3f} requests/s, "
            f"{row['achieved_flops'] / 1e9:.1f} GFLOP/s ({100 * row['share_of_peak']:.0f}% of peak)",
            flush=True,
        )
        if batch == 1:
            exports, writes, root = [], [], Path(tempfile.mkdtemp(prefix="sift-serve-bench-"))
            for _ in range(20):
                start = time.perf_counter()
                blob = trainer.step.export(0)  # the adapter as bytes, as the Trainer hands it over
                exports.append(time.perf_counter() - start)
                start = time.perf_counter()
                blob.write(root).release()  # what the Generator does with it on its node (tmpfs here: /tmp)
                writes.append(time.perf_counter() - start)
            results["export_s_median"], results["export_s_max"] = statistics.median(exports), max(exports)
            results["write_s_median"] = statistics.median(writes)
            results["adapter_mb"] = trainer.step.bank.parameters_per_slot * 4 / 2**20
            windows = [trainer.step.tokens(d, args.tokens) for d in docs[: args.steps]]
            single = trainer.train(TrainRequest(tuple(docs[: args.steps]), spec))
            results["trainer_step_s"] = single.train_seconds / single.steps
            trainer_dtype = next(trainer.step.model.parameters()).dtype
        del trainer
    serial = results["batches"].get("1")
    if serial:
        for row in results["batches"].values():
            row["speedup_over_serial"] = row["tokens_per_s"] / serial["tokens_per_s"]
        results["bare_loop_step_s"] = bare_loop(model_dir, base, spec, windows, trainer_dtype)
        results["step_over_bare_loop"] = results["trainer_step_s"] / results["bare_loop_step_s"]
    results["peak_rss_mb"] = peak_rss_mb()
    if args.device.startswith("cuda"):
        results["machine"]["gpu"] = torch.cuda.get_device_name()
        results["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps({k: v for k, v in results.items() if k not in ("batches", "settings", "machine")}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
