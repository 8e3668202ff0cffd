"""`IndexManifest`: what an index directory's `manifest.json` says about how it was built.

Read once, typed, and checked (format version, JSON shape) at the boundary; the rest of the code reads
fields, never string keys. A sharded index's top-level manifest adds `shards` (S); each shard's adds
`shard` ([i, S]); a benchmark's duplicated copy adds `duplicated`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

FORMAT_VERSION = 2  # 2: tokenizer fingerprint in the manifest
MANIFEST_FILE = "manifest.json"


class IndexMismatchError(ValueError):
    """The index on disk does not fit what is asked of it (another embedder, tokenizer or format)."""


class EmbedderRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    fingerprint: tuple[float, ...]
    """The embedding of a fixed probe text: equal embedders give (nearly) the same vector."""


class Duplication(BaseModel):
    """How a benchmark's copy of an index repeats some of its chunks."""

    model_config = ConfigDict(frozen=True)

    fraction: float
    copies: int
    seed: int
    chunks: int


class IndexManifest(BaseModel):
    """One index directory's manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int
    created: str
    corpus: str | None
    count: int
    dim: int
    kind: str
    """The Faiss index type (IndexFlatIP, IndexIVFFlat, ...)."""
    embedder: EmbedderRef
    tokenizer: str | None
    tokenizer_fingerprint: str | None
    chunk_tokens: int
    chunk_overlap: int
    shards: int = 0
    """S for a sharded index's top-level manifest, else 0."""
    shard: tuple[int, int] | None = None
    """(i, S) for shard i of a sharded index."""
    duplicated: Duplication | None = None

    @staticmethod
    def read(directory: Path) -> IndexManifest:
        """The manifest of the index in `directory`; FileNotFoundError when there is none, IndexMismatchError
        when it is not valid or of another format version."""
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{directory} is not a sift-serve index (no manifest.json); build one with "
                "`sift-serve index build CORPUS --out DIR`"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IndexMismatchError(f"{path} is not valid JSON ({exc}); rebuild the index") from exc
        if not isinstance(data, dict):
            raise IndexMismatchError(f"{path} is not an index manifest; rebuild the index")
        if data.get("format_version") != FORMAT_VERSION:
            raise IndexMismatchError(
                f"{directory}: index format {data.get('format_version')} is not {FORMAT_VERSION}; rebuild it"
            )
        try:
            return IndexManifest.model_validate(data)
        except ValidationError as exc:
            raise IndexMismatchError(f"{path} is not a valid index manifest ({exc}); rebuild the index") from exc

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST_FILE).write_text(
            json.dumps(self.model_dump(mode="json", exclude_defaults=True), indent=2)
        )
