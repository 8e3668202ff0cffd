"""A corpus index in S shards: each shard holds every S-th row; a query takes the top-K of every shard and
merges them into the global top-K, so SIFT runs once on the same candidates as on the unsharded index.

On disk: `DIR/manifest.json` (the unsharded index's manifest plus `"shards": S`) and `DIR/shard-<i>/`, each
a complete index directory whose manifest adds `"shard": [i, S]`. Global row r lives in shard r % S at
local row r // S: shards stay balanced, and picks name the same rows as on the unsharded index.

A shard is anything with `search` and `chunks` in global rows: `LocalShard` (a loaded shard directory) or,
in the cluster, a client of the deployment that holds it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Protocol, TypeVar

import faiss
import numpy as np
from tqdm.auto import tqdm

from selection.corpus import CorpusChunk
from selection.embed import Embedder
from selection.index import Candidates, CorpusIndex, IndexMismatchError, check_embedder, make_faiss_index
from selection.manifest import IndexManifest
from selection.store import DocStore, StoredChunk

log = logging.getLogger(__name__)

_COPY_BATCH = 10_000
T = TypeVar("T")


class Shard(Protocol):
    """One shard's retrieval, in global rows."""

    def search(self, queries: np.ndarray, k: int) -> Candidates: ...

    def chunks(self, rows: Sequence[int]) -> list[StoredChunk]: ...


def shard_dir(directory: Path, i: int) -> Path:
    return Path(directory) / f"shard-{i}"


class LocalShard:
    """Shard i of S, loaded in this process; translates its local rows to global ones."""

    def __init__(self, directory: Path) -> None:
        self.index = CorpusIndex.load(directory)
        position = self.index.manifest.shard
        if position is None:
            raise IndexMismatchError(f"{directory} is not a shard of a sharded index (no 'shard' in its manifest)")
        self.i, self.of = position

    def search(self, queries: np.ndarray, k: int) -> Candidates:
        found = self.index.search(queries, k)
        rows = np.where(found.rows >= 0, found.rows * self.of + self.i, -1)
        return Candidates(rows=rows, scores=found.scores, vectors=found.vectors)

    def chunks(self, rows: Sequence[int]) -> list[StoredChunk]:
        local = [(int(r) - self.i) // self.of for r in rows]
        return [replace(c, row=int(r)) for c, r in zip(self.index.chunks(local), rows, strict=True)]

    def __len__(self) -> int:
        return len(self.index)


def merge_candidates(parts: Sequence[Candidates], k: int) -> Candidates:
    """The global top-k of per-shard top-k lists: best |cos| first, equal scores by row (as `search_abs`)."""
    rows = np.concatenate([p.rows for p in parts], axis=1)
    scores = np.concatenate([np.where(p.rows >= 0, p.scores, -np.inf) for p in parts], axis=1)
    vectors = np.concatenate([p.vectors for p in parts], axis=1)
    order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), -scores), axis=1)[:, :k]
    rows = np.take_along_axis(rows, order, axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    vectors = np.take_along_axis(vectors, order[..., None], axis=1)
    return Candidates(rows=rows, scores=np.where(rows >= 0, scores, 0.0), vectors=vectors)


class ShardTimeoutError(TimeoutError):
    """A shard did not answer within the index's timeout: the search fails as a whole, once, whatever the
    number of prompts in it (retrying prompt by prompt would only wait again)."""


class ShardedIndex:
    """The shards of one index, searched in parallel and merged; a drop-in for `CorpusIndex` in a `Selector`.

    With `timeout_s`, a call that some shard has not answered within that many seconds raises
    `ShardTimeoutError` after one timeout (the shards are asked in parallel)."""

    def __init__(self, manifest: IndexManifest, shards: Sequence[Shard], timeout_s: float | None = None) -> None:
        if len(shards) != manifest.shards:
            raise ValueError(f"the index has {manifest.shards} shards but {len(shards)} were given")
        self.manifest = manifest
        self.shards = list(shards)
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(len(self.shards), thread_name_prefix="shard-search")

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def __len__(self) -> int:
        return self.manifest.count

    def search(self, queries: np.ndarray, k: int) -> Candidates:
        """The k candidates with the largest |cos| over all shards for each of the (B, d) queries."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        k = min(k, len(self))
        return merge_candidates(self._ask([lambda shard=shard: shard.search(queries, k) for shard in self.shards]), k)

    def chunks(self, rows: Iterable[int]) -> list[StoredChunk]:
        """The stored chunks of global `rows`, in that order, each read from the shard that holds it."""
        rows = [int(r) for r in rows]
        by_shard: dict[int, list[int]] = {}
        for r in rows:
            by_shard.setdefault(r % len(self.shards), []).append(r)
        calls = [lambda i=i, wanted=wanted: self.shards[i].chunks(wanted) for i, wanted in by_shard.items()]
        found = {c.row: c for part in self._ask(calls) for c in part}
        return [found[r] for r in rows]

    def _ask(self, calls: list[Callable[[], T]]) -> list[T]:
        """Run the calls on the shards' threads in parallel; their results in order, within one timeout."""
        futures = [self._pool.submit(call) for call in calls]
        _, pending = wait(futures, timeout=self.timeout_s)
        if pending:
            for future in pending:
                future.cancel()
            raise ShardTimeoutError(
                f"{len(pending)} of {len(futures)} index shards did not answer within {self.timeout_s:g} s"
            )
        return [future.result() for future in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def load_index(directory: Path, embedder: Embedder | None = None) -> CorpusIndex | ShardedIndex:
    """Open an index directory, sharded (all shards in this process) or not; with `embedder`, refuse an index
    built by a different one."""
    manifest = IndexManifest.read(directory)
    if not manifest.shards:
        return CorpusIndex.load(directory, embedder)
    if embedder is not None:
        check_embedder(manifest, embedder, directory)
    return ShardedIndex(manifest, [LocalShard(shard_dir(directory, i)) for i in range(manifest.shards)])


def split_index(source: Path, out: Path, shards: int, kind: str = "auto", progress: bool = True) -> Path:
    """Write the index at `source` as `shards` shards to `out` (vectors and texts copied, nothing re-embedded)."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    source, out = Path(source), Path(out)
    manifest = IndexManifest.read(source)
    if manifest.shards:
        raise ValueError(f"{source} is already sharded ({manifest.shards} shards)")
    if shards > manifest.count:
        raise ValueError(f"{shards} shards for {manifest.count} chunks would leave shards empty")
    if out.resolve() == source.resolve():
        raise ValueError("write the shards to another directory than the source index")
    embeddings = np.load(source / "embeddings.npy", mmap_mode="r")
    store = DocStore(source / "docs.sqlite")
    staging = out.with_name(out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tqdm(total=len(embeddings), desc=f"writing {shards} shards", unit="chunk", disable=not progress) as bar:
            for i in range(shards):
                _write_shard(embeddings, store, manifest, staging / f"shard-{i}", i, shards, kind, bar)
        manifest.model_copy(update={"shards": shards}).write(staging)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        store.close()
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %d shards of %s to %s", shards, source, out)
    return out


def _write_shard(
    embeddings: np.ndarray,
    store: DocStore,
    manifest: IndexManifest,
    directory: Path,
    i: int,
    shards: int,
    kind: str,
    bar: tqdm,
) -> None:
    directory.mkdir()
    rows = np.arange(i, len(embeddings), shards)
    vectors = np.ascontiguousarray(embeddings[rows], dtype=np.float32)
    np.save(directory / "embeddings.npy", vectors)
    index = make_faiss_index(kind, vectors.shape[1], len(vectors))
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    faiss.write_index(index, str(directory / "index.faiss"))
    shard_store = DocStore.create(directory / "docs.sqlite")
    for start in range(0, len(rows), _COPY_BATCH):
        stored = store.get(rows[start : start + _COPY_BATCH])
        chunks = [CorpusChunk(id=c.id, doc_id=c.doc_id, text=c.text, source=c.source, title=c.title) for c in stored]
        shard_store.add(start, chunks, [c.hash for c in stored])
        bar.update(len(stored))
    shard_store.commit()
    shard_store.close()
    update = {"count": len(rows), "kind": type(index).__name__, "shard": (i, shards)}
    manifest.model_copy(update=update).write(directory)
