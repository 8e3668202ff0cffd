"""The duplicate condition of the quality benchmark: a copy of an index in which some chunks appear
several times, the paper's failure mode for nearest-neighbour retrieval.

    python -m benchmarks.duplicates SOURCE OUT [--fraction 0.333] [--copies 3] [--seed 0]

A seeded `fraction` of the chunks is stored `copies` times in all (the stored vectors and texts are
copied, nothing is re-embedded): identical vectors score identically, so nearest neighbours fill their
picks with copies, NN-F (which drops identical texts) does not, and SIFT should not either (a second copy
of a picked chunk removes almost no uncertainty at lambda' = 0.01).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from selection.corpus import CorpusChunk
from selection.index import make_faiss_index
from selection.manifest import Duplication, IndexManifest
from selection.store import DocStore

_BATCH = 2048


def duplicate_index(source: Path, out: Path, fraction: float = 1 / 3, copies: int = 3, seed: int = 0) -> Path:
    """Write `source` to `out` with a seeded `fraction` of its chunks appearing `copies` times in all; the
    extra copies are appended after the original rows, with ids `<id>#copy<k>`."""
    if not 0 < fraction <= 1 or copies < 2:
        raise ValueError(f"need 0 < fraction <= 1 and copies >= 2, got {fraction}, {copies}")
    source, out = Path(source), Path(out)
    manifest = IndexManifest.read(source)
    embeddings = np.load(source / "embeddings.npy", mmap_mode="r")
    count = len(embeddings)
    chosen = np.sort(np.random.default_rng(seed).choice(count, size=round(fraction * count), replace=False))
    rows = np.concatenate([np.arange(count), *([chosen] * (copies - 1))])
    vectors = np.ascontiguousarray(embeddings[rows], dtype=np.float32)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    np.save(out / "embeddings.npy", vectors)
    index = make_faiss_index("flat", vectors.shape[1], len(vectors))
    index.add(vectors)
    faiss.write_index(index, str(out / "index.faiss"))
    store, copy_store = DocStore(source / "docs.sqlite"), DocStore.create(out / "docs.sqlite")
    try:
        for start in tqdm(range(0, len(rows), _BATCH), desc="copying chunks", unit="batch"):
            stored = store.get(rows[start : start + _BATCH])
            chunks = [
                CorpusChunk(
                    id=c.id if start + i < count else f"{c.id}#copy{1 + (start + i - count) // len(chosen)}",
                    doc_id=c.doc_id,
                    text=c.text,
                    source=c.source,
                    title=c.title,
                )
                for i, c in enumerate(stored)
            ]
            copy_store.add(start, chunks, [c.hash for c in stored])
        copy_store.commit()
    finally:
        store.close()
        copy_store.close()
    duplicated = Duplication(fraction=fraction, copies=copies, seed=seed, chunks=len(chosen))
    update = {"count": len(rows), "kind": type(index).__name__, "duplicated": duplicated}
    manifest.model_copy(update=update).write(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--fraction", type=float, default=1 / 3)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    duplicate_index(args.source, args.out, args.fraction, args.copies, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
