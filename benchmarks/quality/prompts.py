"""The benchmark's prompts: one document per family of the held-out (or dev) side, cut into a prompt of
`prompt_tokens` tokens and the continuation that is scored, and the 13-gram check that no continuation
occurs on the train side."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.corpus.ngrams import hash_set, overlap
from benchmarks.corpus.recipes import Group
from selection.corpus import read_jsonl


@dataclass(frozen=True)
class Prompt:
    id: str
    domain: str
    """The source: a package's release notes (new knowledge) or an older corpus (contrast)."""
    family: str
    ids: list[int]


def order_key(key: str) -> str:
    """A stable pseudo-random order (and the reuse key of training inputs)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_prompts(path: Path, tokenizer, need: int, per_domain: int) -> list[Prompt]:
    """Up to `per_domain` prompts per domain, one per family (its first document long enough in a stable
    hash order), domains in name order."""
    by_family: dict[str, Prompt] = {}
    for doc in read_jsonl(path):
        family, domain = doc.meta["family"], doc.meta["domain"]
        if family in by_family and order_key(by_family[family].id) < order_key(doc.id):
            continue
        ids = tokenizer(doc.text, add_special_tokens=False).input_ids
        if len(ids) >= need:
            by_family[family] = Prompt(doc.id, domain, family, ids[:need])
    by_domain: dict[str, list[Prompt]] = {}
    for prompt in sorted(by_family.values(), key=lambda p: order_key(p.family)):
        by_domain.setdefault(prompt.domain, []).append(prompt)
    return [p for d in sorted(by_domain) for p in by_domain[d][:per_domain]]


def groups(corpus: Path) -> dict[str, Group]:
    """Each domain's group, from the corpus manifest."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    return {domain: Group(info.get("group", Group.CONTRAST)) for domain, info in manifest["domains"].items()}


def per_domain(prompts: list[Prompt], k: int) -> list[Prompt]:
    """The first `k` prompts of each domain."""
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        seen[p.domain] = seen.get(p.domain, 0) + 1
        if seen[p.domain] <= k:
            out.append(p)
    return out


def contamination(prompts: Iterable[Prompt], tokenizer, train: Path, prompt_tokens: int) -> dict[str, int]:
    """Per prompt, how many word 13-grams of its continuation occur anywhere on the train side."""
    reference = hash_set(doc.text for doc in read_jsonl(train))
    return {p.id: overlap(tokenizer.decode(p.ids[prompt_tokens:]), reference) for p in prompts}
