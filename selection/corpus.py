"""Reading a corpus (JSONL, Parquet, a folder of text files) and cutting it into token-window chunks.

Chunk ids are `<document id>#<chunk number>`: stable across rebuilds of the same corpus with the same
chunk settings, so a document picked yesterday is the same document today.
"""

from __future__ import annotations

import json
import logging
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {
    ".txt",
    ".md",
    ".rst",
    ".py",
    ".go",
    ".c",
    ".h",
    ".html",
    ".tex",
    ".json",
    ".csv",
    ".yaml",
    ".yml",
}


class CorpusError(ValueError):
    """The corpus cannot be read as given; the message says where and why."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str
    title: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CorpusChunk:
    id: str
    doc_id: str
    text: str
    source: str
    title: str


def _document(record: dict[str, Any], where: str, default_source: str) -> Document:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected an object with 'id' and 'text'")
    if "id" not in record or "text" not in record:
        raise CorpusError(f"{where}: every record needs 'id' and 'text' (got keys {sorted(record)})")
    text = record["text"]
    if not isinstance(text, str):
        raise CorpusError(f"{where}: 'text' must be a string")
    meta = {k: v for k, v in record.items() if k not in ("id", "text")}
    return Document(
        id=str(record["id"]),
        text=text,
        source=str(meta.get("source") or default_source),
        title=str(meta.get("title") or ""),
        meta=meta,
    )


def read_jsonl(path: Path) -> Iterator[Document]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            yield _document(record, f"{path}:{lineno}", path.name)


def read_parquet(path: Path) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise CorpusError(f"{path}: not a readable Parquet file ({exc})") from exc
    names = table.schema_arrow.names
    if "id" not in names or "text" not in names:
        raise CorpusError(f"{path}: Parquet corpus needs 'id' and 'text' columns (has {names})")
    row = 0
    for batch in table.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield _document(record, f"{path} row {row}", path.name)


def read_folder(path: Path) -> Iterator[Document]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            log.warning("skipping %s: not UTF-8 text", p)
            continue
        rel = p.relative_to(path).as_posix()
        yield Document(id=rel, text=text, source=rel, title=p.name)


def read_corpus(path: str | Path) -> Iterator[Document]:
    """Documents of a JSONL file, a Parquet file or a folder of text files, in a stable order."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus {path} does not exist")
    if path.is_dir():
        return read_folder(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path)
    if suffix in (".parquet", ".pq"):
        return read_parquet(path)
    raise CorpusError(f"{path}: unsupported corpus format (use .jsonl, .parquet or a folder of text files)")


def stdlib_documents() -> Iterator[Document]:
    """The default corpus: the standard library's top-level modules (real text every machine has)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(root.glob("*.py")):
        text = p.read_text(encoding="utf-8", errors="replace")
        yield Document(id=f"stdlib/{p.name}", text=text, source=f"python-stdlib/{p.name}", title=p.stem)


def chunk_documents(
    documents: Iterable[Document], tokenizer, chunk_tokens: int, overlap: int = 0
) -> Iterator[CorpusChunk]:
    """Cut each document into windows of `chunk_tokens` tokens (of `tokenizer`), as exact substrings."""
    if overlap >= chunk_tokens:
        raise ValueError(f"chunk overlap {overlap} must be smaller than chunk size {chunk_tokens}")
    stride = chunk_tokens - overlap
    seen: set[str] = set()
    for doc in documents:
        if doc.id in seen:
            raise CorpusError(f"duplicate document id {doc.id!r}")
        seen.add(doc.id)
        if not doc.text.strip():
            continue
        offsets = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for number, start in enumerate(range(0, len(offsets), stride)):
            window = offsets[start : start + chunk_tokens]
            end = len(doc.text) if start + chunk_tokens >= len(offsets) else window[-1][1]
            text = doc.text[window[0][0] if start else 0 : end]
            if text.strip():
                yield CorpusChunk(f"{doc.id}#{number}", doc.id, text, doc.source, doc.title)
            if start + chunk_tokens >= len(offsets):
                break
