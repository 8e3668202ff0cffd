"""A corpus document and how recipes make one."""

from __future__ import annotations

Document = dict[str, object]
"""{"id", "text", "domain", "source", "family"} as written to the corpus files; while a recipe builds it,
also "links" and "raw_bytes" (read by `build`, never written out)."""


def document(
    domain: str,
    id_: str,
    text: str,
    source: str,
    family: str,
    links: list[str] | None = None,
    raw_bytes: int | None = None,
) -> Document:
    """A document; `links` (families it derives from) and `raw_bytes` (its size before boilerplate was
    stripped) are read by `build` and not written out."""
    doc: Document = {"id": f"{domain}/{id_}", "text": text, "domain": domain, "source": source}
    doc["family"] = f"{domain}/{family}"
    if links:
        doc["links"] = [f"{domain}/{link}" for link in links]
    if raw_bytes is not None:
        doc["raw_bytes"] = raw_bytes
    return doc


def decode(data: bytes) -> str:
    """A packaged text file as text: UTF-8 (invalid bytes replaced), Unix newlines, stripped."""
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n").strip()
