"""Document store: chunk texts and metadata by row number or id, on disk (SQLite), never all in memory."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from selection.corpus import CorpusChunk

_SCHEMA = """
CREATE TABLE chunks (
    row INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    doc_id TEXT NOT NULL,
    source TEXT NOT NULL,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    hash TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class StoredChunk:
    row: int
    id: str
    doc_id: str
    source: str
    title: str
    text: str
    hash: str


class DocStore:
    """Rows of the Faiss index map to chunks here; lookups read only the rows asked for."""

    def __init__(self, path: Path, writable: bool = False) -> None:
        self.path = Path(path)
        uri = f"file:{self.path}?mode={'rwc' if writable else 'ro'}"
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, path: Path) -> DocStore:
        path = Path(path)
        path.unlink(missing_ok=True)
        store = cls(path, writable=True)
        store._conn.execute(_SCHEMA)
        return store

    @classmethod
    def open_checked(cls, path: Path) -> DocStore:
        """Open a store and read it once, so that a corrupt file fails here rather than on a request."""
        store = cls(path)
        try:
            len(store)
        except Exception:
            store.close()
            raise
        return store

    def add(self, start_row: int, chunks: Sequence[CorpusChunk], hashes: Sequence[str]) -> None:
        rows = [
            (start_row + i, c.id, c.doc_id, c.source, c.title, c.text, h)
            for i, (c, h) in enumerate(zip(chunks, hashes, strict=True))
        ]
        with self._lock:
            self._conn.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def commit(self) -> None:
        with self._lock:
            self._conn.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def get(self, rows: Iterable[int]) -> list[StoredChunk]:
        """Chunks for the given rows, in the given order (repeats allowed)."""
        rows = [int(r) for r in rows]
        unique = sorted(set(rows))
        with self._lock:
            found = {
                r[0]: StoredChunk(*r)
                for r in self._conn.execute(
                    f"SELECT row, id, doc_id, source, title, text, hash FROM chunks WHERE row IN "
                    f"({','.join('?' * len(unique))})",
                    unique,
                )
            }
        missing = [r for r in unique if r not in found]
        if missing:
            raise KeyError(f"rows not in the document store: {missing[:5]}")
        return [found[r] for r in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
