"""The corpus index: a Faiss index over chunk embeddings, the embeddings themselves, and a document store.

On disk (one directory): `manifest.json` (what built it: embedder, tokenizer, chunking, counts),
`index.faiss`, `embeddings.npy` (float32, memory-mapped at load: SIFT needs the candidates' vectors,
whatever the index type) and `docs.sqlite` (texts by row). Candidates are retrieved by |cos|: the index
is searched with +q and -q and the two lists merged, as the paper's library does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Iterable, Sized
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from selection.corpus import CorpusChunk, CorpusError
from selection.embed import Embedder, fingerprint
from selection.manifest import FORMAT_VERSION, EmbedderRef, IndexManifest, IndexMismatchError
from selection.store import DocStore, StoredChunk

log = logging.getLogger(__name__)

FLAT_LIMIT = 200_000  # "auto" switches from exact flat search to IVF beyond this many vectors
_FINGERPRINT_MIN_COS = 0.99
_RESCORE_MARGIN = 16  # extra rows Faiss proposes, re-ranked exactly (see `retrieve`)


@dataclass(frozen=True)
class Candidates:
    """Top-K retrieval for B queries: rows into the index, |cos| scores and vectors; -1 pads short rows."""

    rows: np.ndarray  # (B, K) int64
    scores: np.ndarray  # (B, K) float64, |cos| computed exactly
    vectors: np.ndarray  # (B, K, d) float32


def make_faiss_index(kind: str, dim: int, count: int) -> faiss.Index:
    """An inner-product Faiss index of the requested kind ('auto' picks by corpus size)."""
    if kind == "auto":
        kind = "flat" if count <= FLAT_LIMIT else "ivf"
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        return faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    if kind == "ivf":
        nlist = max(1, min(count // 39, int(4 * math.sqrt(count))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(nlist, 32)
        return index
    raise ValueError(f"unknown index kind {kind!r} (use auto, flat, ivf or hnsw)")


def to_gpu_if_available(index: faiss.Index) -> faiss.Index:
    """The index copied onto every GPU this Faiss build sees (searches then run there), else unchanged.

    HNSW has no GPU form in Faiss and stays on the CPU; faiss-cpu builds have no GPUs to see.
    """
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0 and not isinstance(index, faiss.IndexHNSW):
        log.info("moving the Faiss index to %d GPU(s)", faiss.get_num_gpus())
        return faiss.index_cpu_to_all_gpus(index)
    return index


def search_abs(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows by |inner product| for each query: search +q and -q, merge, drop duplicates."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, index.ntotal)
    both_scores, both_rows = index.search(np.concatenate([queries, -queries]), k)
    b = len(queries)
    scores = np.concatenate([both_scores[:b], both_scores[b:]], axis=1)
    rows = np.concatenate([both_rows[:b], both_rows[b:]], axis=1)
    scores = np.where(rows < 0, -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind="stable")
    scores = np.take_along_axis(scores, order, axis=1)
    rows = np.take_along_axis(rows, order, axis=1)
    out_rows = np.full((b, k), -1, dtype=np.int64)
    out_scores = np.zeros((b, k), dtype=np.float32)
    for i in range(b):
        # A row can come back from both searches only when its score is ~0; keep its first occurrence.
        _, first = np.unique(rows[i], return_index=True)
        keep = np.sort(first[rows[i][first] >= 0])[:k]
        out_rows[i, : len(keep)] = rows[i][keep]
        out_scores[i, : len(keep)] = scores[i][keep]
    return out_rows, out_scores


def retrieve(index: faiss.Index, embeddings: np.ndarray, queries: np.ndarray, k: int) -> Candidates:
    """Top-k by |cos| from `index`, with the candidates' vectors read from `embeddings` (row-aligned).

    Faiss proposes k + a margin of rows; their scores are then recomputed exactly (in float64, so identical
    vectors score identically wherever they sit in the index) and equal scores go to the lower row. The
    result therefore does not depend on how the index is laid out: whole or in shards, the same rows come
    back in the same order (unless more than the margin of exact ties straddle the k-th place).
    """
    rows, _ = search_abs(index, queries, k + _RESCORE_MARGIN)
    vectors = np.zeros((*rows.shape, embeddings.shape[1]), dtype=np.float32)
    valid = rows >= 0
    flat = np.unique(rows[valid])
    lookup = np.searchsorted(flat, rows[valid])
    vectors[valid] = np.asarray(embeddings[flat])[lookup]
    scores = np.stack(
        [
            np.abs((v.astype(np.float64) * q.astype(np.float64)).sum(axis=1))
            for v, q in zip(vectors, queries, strict=True)
        ]
    )
    scores = np.where(valid, scores, -np.inf)
    order = np.lexsort((np.where(valid, rows, np.iinfo(np.int64).max), -scores), axis=1)[:, :k]
    rows = np.take_along_axis(rows, order, axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    return Candidates(
        rows=rows,
        scores=np.where(rows >= 0, scores, 0.0),
        vectors=np.take_along_axis(vectors, order[..., None], axis=1),
    )


def _text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class CorpusIndex:
    """A built corpus index, loaded for retrieval."""

    def __init__(
        self,
        directory: Path,
        manifest: IndexManifest,
        index: faiss.Index,
        embeddings: np.ndarray,
        store: DocStore,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.index = index
        self.embeddings = embeddings
        self.store = store

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def __len__(self) -> int:
        return self.manifest.count

    @staticmethod
    def build(
        chunks: Iterable[CorpusChunk],
        out: Path,
        embedder: Embedder,
        *,
        tokenizer_name: str,
        tokenizer_fingerprint: str = "",
        chunk_tokens: int,
        chunk_overlap: int,
        kind: str = "auto",
        batch_size: int = 64,
        corpus: str = "",
        progress: bool = True,
    ) -> CorpusIndex:
        """Embed `chunks` and write a complete index directory to `out` (replacing one that is there)."""
        out = Path(out)
        staging = out.with_name(out.name + ".building")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            store = DocStore.create(staging / "docs.sqlite")
            parts: list[np.ndarray] = []
            count = 0
            pending: list[CorpusChunk] = []
            total = len(chunks) if isinstance(chunks, Sized) else None
            bar = tqdm(desc="embedding chunks", unit="chunk", total=total, disable=not progress)

            def flush() -> None:
                nonlocal count
                vectors = embedder.embed([c.text for c in pending], batch_size=batch_size)
                store.add(count, pending, [_text_hash(c.text) for c in pending])
                parts.append(vectors)
                count += len(pending)
                bar.update(len(pending))
                pending.clear()

            for chunk in chunks:
                pending.append(chunk)
                if len(pending) >= 4 * batch_size:
                    flush()
            if pending:
                flush()
            bar.close()
            store.commit()
            store.close()
            if count == 0:
                raise CorpusError(f"corpus {corpus or '(given)'} has no documents with text: nothing to index")
            embeddings = np.concatenate(parts)
            if not np.isfinite(embeddings).all():
                raise ValueError("the embedder produced NaN or infinite vectors")
            np.save(staging / "embeddings.npy", embeddings)
            index = make_faiss_index(kind, embeddings.shape[1], count)
            if not index.is_trained:
                index.train(embeddings)
            index.add(embeddings)
            faiss.write_index(index, str(staging / "index.faiss"))
            IndexManifest(
                format_version=FORMAT_VERSION,
                created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                corpus=corpus,
                count=count,
                dim=int(embeddings.shape[1]),
                kind=type(index).__name__,
                embedder=EmbedderRef(name=embedder.name, fingerprint=tuple(fingerprint(embedder))),
                tokenizer=tokenizer_name,
                tokenizer_fingerprint=tokenizer_fingerprint,
                chunk_tokens=chunk_tokens,
                chunk_overlap=chunk_overlap,
            ).write(staging)
            shutil.rmtree(out, ignore_errors=True)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("indexed %d chunks into %s", count, out)
        return CorpusIndex.load(out)

    @staticmethod
    def load(directory: Path, embedder: Embedder | None = None, gpu: bool = True) -> CorpusIndex:
        """Open an index directory; with `embedder`, refuse one built by a different embedder."""
        directory = Path(directory)
        manifest = IndexManifest.read(directory)
        if manifest.shards:
            raise IndexMismatchError(f"{directory} is a sharded index: open it with selection.shards.load_index")
        if embedder is not None:
            check_embedder(manifest, embedder, directory)
        index = _read(directory / "index.faiss", lambda path: faiss.read_index(str(path)))
        if gpu:
            index = to_gpu_if_available(index)
        embeddings = _read(directory / "embeddings.npy", lambda path: np.load(path, mmap_mode="r"))
        if embeddings.shape != (manifest.count, manifest.dim) or index.ntotal != manifest.count:
            raise IndexMismatchError(f"{directory}: files disagree with the manifest; rebuild the index")
        store = _read(directory / "docs.sqlite", DocStore.open_checked)
        if len(store) != manifest.count:
            raise IndexMismatchError(f"{directory / 'docs.sqlite'} holds {len(store)} chunks, not {manifest.count}")
        return CorpusIndex(directory, manifest, index, embeddings, store)

    def search(self, queries: np.ndarray, k: int) -> Candidates:
        """The k candidates with the largest |cos| for each of the (B, d) queries, with their vectors."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[1]} != index dimension {self.dim}")
        if not np.isfinite(queries).all():
            raise ValueError("query embeddings contain NaN or infinite values")
        return retrieve(self.index, self.embeddings, queries, k)

    def chunks(self, rows: Iterable[int]) -> list[StoredChunk]:
        """The stored chunks of `rows`, in that order (repeats allowed)."""
        return self.store.get(rows)

    def close(self) -> None:
        self.store.close()


def _read(path: Path, reader):
    """`reader(path)`, or IndexMismatchError naming the file when it is missing or unreadable."""
    if not path.is_file():
        raise IndexMismatchError(f"{path} is missing; rebuild the index")
    try:
        return reader(path)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IndexMismatchError(f"{path} is unreadable ({first[:200]}); rebuild the index") from exc


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary: equal exactly when token ids mean the same strings."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha1(json.dumps(vocab).encode("utf-8")).hexdigest()


def check_tokenizer(manifest: IndexManifest, tokenizer, directory: Path | str = "index") -> None:
    """Raise IndexMismatchError unless the index was chunked with this tokenizer."""
    if manifest.tokenizer_fingerprint != tokenizer_fingerprint(tokenizer):
        raise IndexMismatchError(
            f"{directory} was chunked with tokenizer {manifest.tokenizer!r}, which is not the served "
            "model's tokenizer; rebuild the index with --model pointing at the served model"
        )


def check_embedder(manifest: IndexManifest, embedder: Embedder, directory: Path | str = "index") -> None:
    """Raise IndexMismatchError unless `embedder` is the one the index was built with."""
    built = manifest.embedder
    if built.name != embedder.name or manifest.dim != embedder.dim:
        raise IndexMismatchError(
            f"{directory} was built with embedder {built.name} ({manifest.dim}-d) but {embedder.name} "
            f"({embedder.dim}-d) is loaded; rebuild the index or load the matching embedder"
        )
    now = np.asarray(fingerprint(embedder))
    cos = float(now @ np.asarray(built.fingerprint))
    if cos < _FINGERPRINT_MIN_COS:
        raise IndexMismatchError(
            f"{directory}: embedder {embedder.name} gives different vectors than when the index was built "
            f"(probe cosine {cos:.3f}); rebuild the index"
        )
