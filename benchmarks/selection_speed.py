"""Selection speed: SIFT against the Faiss retrieval it follows, against activeft, and batched vs sequential.

All timings are medians over repeats in one run on identical inputs (random unit vectors, d = 384):
(a) |cos| top-K retrieval from flat indexes of 100k and 1M vectors, and the SIFT that follows it, at
    K = 200 and 1000, N = 50, per prompt;
(b) this SIFT against activeft's Retriever (its SIFT part, same candidates, same lambda'), with a check
    that the picks are identical;
(c) 16 prompts in one batched call against 16 sequential calls.

With `--device cuda` SIFT runs on the GPU and the Faiss index is copied onto it (faiss-gpu), the setting of
the paper's "SIFT adds about 5% to retrieval"; the candidates still cross from Faiss's output to torch on
the device, as in the server. activeft's part stays on the CPU (`--skip-activeft` leaves it out).

    python -m benchmarks.selection_speed [--quick] [--device cpu|cuda] [--sizes 100000 1000000]
        [--skip-activeft] [--out benchmarks/results/selection_speed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import faiss
import numpy as np
import torch

from selection import select_batch
from selection.index import retrieve, to_gpu_if_available

D = 384
N = 50
LAMBDA = 0.01


def synchronize() -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unit_vectors(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((count, D), dtype=np.float32)
    for start in range(0, count, 100_000):  # chunked: keeps peak memory at the output size
        block = rng.standard_normal((min(100_000, count - start), D), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def sift_one(queries: np.ndarray, vectors: np.ndarray, device: str = "cpu") -> list:
    """SIFT for each query on its own (one call per prompt), on `device`."""
    return [sift_batched(queries[i : i + 1], vectors[i : i + 1], device)[0] for i in range(len(queries))]


def sift_batched(queries: np.ndarray, vectors: np.ndarray, device: str = "cpu") -> list:
    """SIFT for all queries in one call, on `device` (the copy there is part of the cost, as in the server)."""
    targets, candidates = torch.from_numpy(queries).to(device), torch.from_numpy(vectors).to(device)
    return select_batch(targets, candidates, N, lambda_=LAMBDA)


def retrieval_vs_sift(
    index: faiss.Index, embeddings: np.ndarray, queries: np.ndarray, k: int, repeats: int, device: str
) -> dict:
    """Median retrieval and SIFT times for one prompt and for 16 prompts at once."""
    one = queries[:1]
    t_faiss = median_time(partial(retrieve, index, embeddings, one, k), repeats)
    t_sift = median_time(partial(sift_one, one, retrieve(index, embeddings, one, k).vectors, device), repeats)
    few = max(3, repeats // 3)
    t_faiss16 = median_time(partial(retrieve, index, embeddings, queries, k), few)
    cands16 = retrieve(index, embeddings, queries, k).vectors
    t_sift16 = median_time(partial(sift_batched, queries, cands16, device), few)
    return {
        "index_size": index.ntotal,
        "K": k,
        "N": N,
        "faiss_s": t_faiss,
        "sift_s": t_sift,
        "sift_overhead": t_sift / t_faiss,
        "faiss_16_s": t_faiss16,
        "sift_batched_16_s": t_sift16,
        "sift_overhead_16": t_sift16 / t_faiss16,
    }


def bench_retrieval_vs_sift(sizes: list[int], ks: list[int], repeats: int, device: str) -> list[dict]:
    rows = []
    queries = unit_vectors(16, seed=1)
    for size in sizes:
        embeddings = unit_vectors(size, seed=0)
        index = faiss.IndexFlatIP(D)
        index.add(embeddings)
        if device.startswith("cuda"):
            index = to_gpu_if_available(index)
        for k in ks:
            r = retrieval_vs_sift(index, embeddings, queries, k, repeats, device)
            rows.append(r)
            print(
                f"(a) index {size:>9,} K={k:<5} faiss {r['faiss_s'] * 1e3:8.1f} ms"
                f"  SIFT {r['sift_s'] * 1e3:7.1f} ms"
                f" (+{100 * r['sift_overhead']:5.1f}%)  | 16 prompts: faiss {r['faiss_16_s'] * 1e3:8.1f} ms"
                f"  SIFT {r['sift_batched_16_s'] * 1e3:7.1f} ms (+{100 * r['sift_overhead_16']:5.1f}%)",
                flush=True,
            )
        del index, embeddings
    return rows


def bench_against_activeft(size: int, ks: list[int], repeats: int) -> list[dict]:
    from activeft.sift import Retriever

    embeddings = unit_vectors(size, seed=0)
    index = faiss.IndexFlatIP(D)
    index.add(embeddings)
    query = unit_vectors(1, seed=2)
    rows = []
    for k in ks:
        retriever = Retriever(index, llambda=LAMBDA, device=torch.device("cpu"))
        activeft_sift, activeft_faiss, theirs = [], [], None
        for _ in range(max(3, repeats // 3)):
            _, theirs, _, took = retriever.search(query, N=N, K=k)
            activeft_sift.append(took.sift)
            activeft_faiss.append(took.faiss)
        cands = retrieve(index, embeddings, query, k)
        ours = cands.rows[0][sift_one(query, cands.vectors)[0].indices.numpy()]
        t_ours = median_time(partial(sift_one, query, cands.vectors), repeats)
        t_theirs = statistics.median(activeft_sift)
        identical = [int(i) for i in ours] == [int(i) for i in theirs]
        rows.append(
            {
                "index_size": size,
                "K": k,
                "N": N,
                "activeft_sift_s": t_theirs,
                "activeft_faiss_s": statistics.median(activeft_faiss),
                "ours_sift_s": t_ours,
                "speedup": t_theirs / t_ours,
                "identical_picks": identical,
            }
        )
        print(
            f"(b) K={k:<5} activeft SIFT {t_theirs * 1e3:8.1f} ms  ours {t_ours * 1e3:6.1f} ms  "
            f"speedup {t_theirs / t_ours:6.1f}x  identical picks: {identical}",
            flush=True,
        )
    return rows


def bench_batching(ks: list[int], repeats: int, device: str) -> list[dict]:
    rows = []
    queries = unit_vectors(16, seed=3)
    for k in ks:
        cands = unit_vectors(16 * k, seed=4).reshape(16, k, D)
        t_seq = median_time(partial(sift_one, queries, cands, device), max(3, repeats // 3))
        t_bat = median_time(partial(sift_batched, queries, cands, device), max(3, repeats // 3))
        same = all(
            a.indices.tolist() == b.indices.tolist()
            for a, b in zip(sift_one(queries, cands, device), sift_batched(queries, cands, device), strict=True)
        )
        rows.append(
            {
                "prompts": 16,
                "K": k,
                "N": N,
                "sequential_s": t_seq,
                "batched_s": t_bat,
                "speedup": t_seq / t_bat,
                "identical_picks": same,
            }
        )
        print(
            f"(c) 16 prompts K={k:<5} sequential {t_seq * 1e3:8.1f} ms  batched {t_bat * 1e3:7.1f} ms  "
            f"speedup {t_seq / t_bat:5.1f}x  identical picks: {same}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not the targets)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where SIFT runs")
    parser.add_argument("--sizes", type=int, nargs="+", help="index sizes (default 100k and 1M; --quick: 20k)")
    parser.add_argument("--skip-activeft", action="store_true", help="leave out (b), the activeft comparison")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/selection_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sizes = args.sizes or ([20_000] if args.quick else [100_000, 1_000_000])
    ks = [200, 1000]
    results = {
        "machine": {
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
            "torch": torch.__version__,
            "faiss": faiss.__version__,
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        },
        "settings": {"d": D, "N": N, "lambda": LAMBDA, "repeats": args.repeats, "quick": args.quick, "sizes": sizes},
        "retrieval_vs_sift": bench_retrieval_vs_sift(sizes, ks, args.repeats, args.device),
        "against_activeft": None if args.skip_activeft else bench_against_activeft(sizes[0], ks, args.repeats),
        "batching": bench_batching(ks, args.repeats, args.device),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
