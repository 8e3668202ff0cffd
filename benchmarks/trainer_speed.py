"""Trainer speed: per-step time against a bare torch loop, adapter export time, peak memory, tokens/s.

In one run, alternating so that machine noise hits both alike: a `Trainer` request of S steps, then a
bare hand-written loop (forward, loss, backward, AdamW step) of S steps over the same peft-wrapped
model, the same pre-tokenised windows and the same optimizer settings. Medians over repeats.

    python -m benchmarks.trainer_speed [--tokens 256] [--steps 4] [--repeats 5] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sysconfig
import time
from pathlib import Path

import torch

from adapters.config import TrainerConfig
from adapters.trainer import Trainer, TrainRequest
from infra.config import default_cache_dir
from infra.models import resolve_model


def documents(count: int) -> list[str]:
    """Real text: standard-library modules, one per step."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        "csv.py",
        "heapq.py",
        "bisect.py",
        "fnmatch.py",
        "glob.py",
        "shlex.py",
        "textwrap.py",
        "string.py",
    ]
    return [(root / files[i % len(files)]).read_text()[:20_000] for i in range(count)]


def bare_loop(trainer: Trainer, batches: list[torch.Tensor], lr: float) -> float:
    """Seconds per step of the plainest loop over the trainer's own (peft-wrapped) model."""
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, eps=1e-8, weight_decay=0.0)
    trainer.model.train()
    start = time.perf_counter()
    for ids in batches:
        loss = trainer.model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    trainer.model.eval()
    return elapsed / len(batches)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256, help="max_train_tokens per step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/trainer_speed.json"))
    args = parser.parse_args()

    model_dir = resolve_model(args.model, default_cache_dir())
    rss_before = peak_rss_mb()
    config = TrainerConfig(max_train_tokens=args.tokens, max_steps=args.steps, time_budget_s=None, device=args.device)
    trainer = Trainer(model_dir, config)
    docs = documents(args.steps)
    batches = [trainer._tokens(d, args.tokens) for d in docs]
    trainer.train(TrainRequest(documents=docs[:1])).adapter.release()  # warm-up
    bare_loop(trainer, batches[:1], config.learning_rate)

    trainer_step, bare_step, tokens_per_s = [], [], []
    for r in range(args.repeats):
        result = trainer.train(TrainRequest(documents=docs))
        result.adapter.release()
        trainer_step.append(result.train_seconds / result.steps)
        tokens_per_s.append(result.tokens / result.train_seconds)
        bare_step.append(bare_loop(trainer, batches, config.learning_rate))
        print(
            f"repeat {r + 1}: trainer {trainer_step[-1]:.3f} s/step, bare loop {bare_step[-1]:.3f} s/step",
            flush=True,
        )

    exports = []
    for _ in range(20):
        start = time.perf_counter()
        handle = trainer.export()
        exports.append(time.perf_counter() - start)
        handle.release()
    adapter_mb = sum(t.numel() * t.element_size() for t in trainer._adapter_tensors.values()) / 2**20

    results = {
        "machine": {
            "platform": platform.platform(),
            "device": args.device,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "settings": {
            "model": str(model_dir),
            "tokens_per_step": args.tokens,
            "steps": args.steps,
            "repeats": args.repeats,
            "rank": config.rank,
            "dtype": str(trainer.dtype),
        },
        "trainer_step_s": statistics.median(trainer_step),
        "bare_loop_step_s": statistics.median(bare_step),
        "ratio": statistics.median(trainer_step) / statistics.median(bare_step),
        "ratio_per_repeat": [a / b for a, b in zip(trainer_step, bare_step, strict=True)],
        "tokens_per_s": statistics.median(tokens_per_s),
        "export_s_median": statistics.median(exports),
        "export_s_max": max(exports),
        "adapter_mb": adapter_mb,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_before_model": rss_before,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }
    print(
        f"trainer {results['trainer_step_s']:.3f} s/step vs bare {results['bare_loop_step_s']:.3f} s/step "
        f"(ratio {results['ratio']:.3f}); {results['tokens_per_s']:.0f} tokens/s; export "
        f"{results['export_s_median'] * 1e3:.1f} ms ({adapter_mb:.1f} MB); "
        f"peak RSS {results['peak_rss_mb']:.0f} MB"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
