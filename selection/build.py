"""Building an index from a corpus with the configured model tokenizer and embedder, and the default index."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

from infra.models import resolve_model
from selection.config import IndexConfig, ModelsConfig
from selection.corpus import Document, chunk_documents, read_corpus, stdlib_documents
from selection.embed import Embedder, load_embedder
from selection.index import CorpusIndex, tokenizer_fingerprint
from selection.manifest import IndexManifest, IndexMismatchError

log = logging.getLogger(__name__)


def default_index_dir(models: ModelsConfig) -> Path:
    """Where the default (Python standard library) index for this embedder lives."""
    return models.cache_dir / "indexes" / f"python-stdlib-{models.embedder}"


def build_index(
    documents: Iterable[Document],
    out: Path,
    models: ModelsConfig,
    index: IndexConfig,
    *,
    corpus_name: str,
    embedder: Embedder | None = None,
    progress: bool = True,
) -> CorpusIndex:
    """Chunk `documents` with the base model's tokenizer, embed them, and write the index to `out`."""
    from transformers import AutoTokenizer

    model_dir = resolve_model(models.base_model, models.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    embedder = embedder or load_embedder(models.embedder, model_dir, models.device)
    # Chunked up front (texts take about as much memory as their embeddings), so embedding shows an ETA.
    documents = tqdm(documents, desc="chunking documents", unit="doc", disable=not progress)
    chunks = list(chunk_documents(documents, tokenizer, index.chunk_tokens, index.chunk_overlap))
    return CorpusIndex.build(
        chunks,
        out,
        embedder,
        tokenizer_name=str(getattr(tokenizer, "name_or_path", model_dir)),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        chunk_tokens=index.chunk_tokens,
        chunk_overlap=index.chunk_overlap,
        kind=index.kind,
        batch_size=index.batch_size,
        corpus=corpus_name,
        progress=progress,
    )


def build_corpus_index(corpus: Path, out: Path, models: ModelsConfig, index: IndexConfig) -> CorpusIndex:
    """`sift-serve index build CORPUS --out DIR`."""
    return build_index(read_corpus(corpus), out, models, index, corpus_name=str(corpus))


def ensure_default_index(models: ModelsConfig, index: IndexConfig) -> Path:
    """Build the default index from the standard library unless a complete one is already there."""
    out = default_index_dir(models)
    if (out / "manifest.json").is_file():
        try:
            IndexManifest.read(out)
            log.info("default index already built at %s", out)
            return out
        except IndexMismatchError:
            log.info("default index at %s is outdated; rebuilding", out)
    log.info("building the default index (Python standard library) at %s", out)
    build_index(stdlib_documents(), out, models, index, corpus_name="python-stdlib")
    return out
