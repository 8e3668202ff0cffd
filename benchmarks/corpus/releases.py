"""New-knowledge domains: the release notes of pinned 2025-2026 package releases, one domain per package.

Each package's notes are parsed into one document (and family) per release dated 2025 or later, the
text the base model (released November 2024) cannot have seen. Link and credit boilerplate is stripped
(`boilerplate.strip`), and so are template paragraphs that recur across a package's releases ("We've
just uploaded mypy X to PyPI ..."), so that what is left is what each release changed.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from packaging.version import Version

from benchmarks.corpus.boilerplate import strip
from benchmarks.corpus.documents import Document, decode, document
from benchmarks.corpus.fetch import Pin, read_members


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
CHANGELOGS = (
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
        text = decode(data)
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
    (log,) = [c for c in CHANGELOGS if c.package == package]

    def parse(files: dict[str, Path]) -> Iterator[Document]:
        releases: dict[str, str] = {}
        for version, text in _release_notes(log, files[package]):
            releases.setdefault(version, text)  # SQLAlchemy's 2.1 changelog includes 2.0's releases
        stripped = {version: strip(text) for version, text in releases.items()}
        common = _template_paragraphs(list(stripped.values()))
        for version, text in releases.items():
            kept = "\n\n".join(p for p in stripped[version].split("\n\n") if _shape(p) not in common)
            yield document(package, version, kept, package, version, raw_bytes=len(text.encode("utf-8")))

    return parse


PINS = {
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
