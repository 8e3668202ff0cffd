"""Word 13-grams: the unit of shared text for the leak-free split and the contamination check.

Text is lower-cased and cut into word tokens (`\\w+`); each run of 13 consecutive words is hashed to a
64-bit number (CRC-32 per word, combined by a polynomial rolling hash), so a document becomes a sorted
array of distinct hashes and two documents share text exactly when their arrays intersect. Thirteen
words is the window GPT-3's and later contamination studies use: long enough that a shared run is
copied text, not a common phrase.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

N = 13
_WORD = re.compile(r"\w+")
_BASE = np.uint64(1_000_003)


def ngram_hashes(text: str, n: int = N) -> np.ndarray:
    """The distinct hashes of `text`'s word n-grams (uint64, sorted; empty when under n words)."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return np.empty(0, dtype=np.uint64)
    ids = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))
    count = len(words) - n + 1
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            hashes = hashes * _BASE + ids[j : j + count]
    return np.unique(hashes)


def shared_pairs(texts: Sequence[str], n: int = N) -> set[tuple[int, int]]:
    """Index pairs (i, j), i < j, of texts that share at least one word n-gram."""
    arrays = [ngram_hashes(t, n) for t in texts]
    if not any(len(a) for a in arrays):
        return set()
    hashes = np.concatenate(arrays)
    owners = np.concatenate([np.full(len(a), i, dtype=np.int64) for i, a in enumerate(arrays)])
    order = np.argsort(hashes, kind="stable")
    hashes, owners = hashes[order], owners[order]
    same = hashes[1:] == hashes[:-1]
    pairs = np.stack([owners[:-1][same], owners[1:][same]], axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return {(int(min(a, b)), int(max(a, b))) for a, b in np.unique(pairs, axis=0)} if len(pairs) else set()


def hash_set(texts: Iterable[str], n: int = N) -> np.ndarray:
    """Every distinct n-gram hash of `texts` (sorted), for membership tests against other text."""
    arrays = [ngram_hashes(t, n) for t in texts]
    return np.unique(np.concatenate(arrays)) if arrays else np.empty(0, dtype=np.uint64)


def overlap(text: str, reference: np.ndarray, n: int = N) -> int:
    """How many of `text`'s distinct n-grams occur in `reference` (a sorted hash array from `hash_set`)."""
    return int(np.isin(ngram_hashes(text, n), reference, assume_unique=True).sum())
