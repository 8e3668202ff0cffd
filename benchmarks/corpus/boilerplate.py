"""Link and credit boilerplate in release notes, stripped before the split.

Up to half the bytes of some changelogs are pull-request links, issue numbers and @handles: text that
measures a changelog's format rather than what a release changed. `strip` removes, in order:

- credits in parentheses that cite a pull request: ``(Jane Doe, PR [123](https://...))``, and
  ``by @jane in [#123](https://...)``;
- sentences that only credit people: ``Patch by Jane Doe.``, ``Contributed by @jane``, ``Thanks to ...``,
  ``Pull request courtesy Jane Doe.``;
- sections that only list people (``### Acknowledgements``, reStructuredText ``Authors`` and
  ``Contributors``), up to the next heading;
- reStructuredText reference roles (``:issue:`123```, ``:pr:``, ``:user:``, ``:gh:``, ``:ticket:``,
  ``:cve:``, ``:commit:``) and SQLAlchemy's ``:tags:``, ``:tickets:`` and ``:versions:`` fields;
- links, keeping their text: ``[text](url)`` and ```text <url>`_`` become ``text``; bare URLs go;
- issue numbers (``#1234``, ``gh-1234``) and @handles;

then the punctuation those leave behind (empty brackets, dangling commas) and runs of spaces.
"""

from __future__ import annotations

import re

_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, flags), replacement)
    for pattern, replacement, flags in (
        (r"[ \t]*\((?:[^()\n]|\([^()\n]*\))*?\bPRs? \[?#?\d+(?:[^()\n]|\([^()\n]*\))*\)", "", 0),
        (r"^(#+|\*\*)\s*Acknowledge?ments\b.*?(?=^#|\Z)", "", re.M | re.S),
        (
            r"^(?:Acknowledge?ments|Authors|Contributors)\n[=\-~^*]{3,}\n.*?(?=^[^\s\n][^\n]*\n[=\-~^*]{3,}\n|\Z)",
            "",
            re.M | re.S,
        ),
        (r"[ \t]*\b(?:Patch(?:es)?|Contributed|Reported|Originally proposed) by\b[^.\n]*\.?", "", 0),
        (r"[ \t]*\b(?:Pull request|Patch) courtesy\b[^.\n]*\.?", "", 0),
        (r"[ \t]*\b(?:Thanks|Credit) to\b[^.\n]*\.?", "", 0),
        (r"^[ \t]*:(?:tags|tickets|versions|references):.*$\n?", "", re.M),
        (
            r"[ \t]*\bby @[\w-]+(?:\[bot\])?(?:(?:,| and| &) @[\w-]+(?:\[bot\])?)*(?: in \[?#?\d+\]?(?:\([^)]*\))?)?",
            "",
            0,
        ),
        (r":(?:issue|pr|user|gh|ticket|cve|commit|bpo|ghsa)s?:`[^`]*`", "", 0),
        (r"`#?\d+ <[^>]+>`__?", "", 0),
        (r"`([^`<]+?)\s*<[^>]+>`__?", r"\1", 0),
        (r"!?\[([^\]]*)\]\([^)]*\)", r"\1", 0),
        (r"<?https?://[^\s)>\]]+>?", "", 0),
        (r"(?<![\w&/])(?:#|gh-|GH-)\d+\b", "", 0),
        (r"(?<![\w.@/`])@[A-Za-z0-9][\w-]*(?:\[bot\])?", "", 0),
        (r"\(\s*(?:(?:and|by|in|,|;|&|PRs?|see)\s*)*\)", "", re.I),
        (r"\[\s*(?:,\s*)*\]", "", 0),
        (r"[ \t]+([,.;)]|:(?=\s|$))", r"\1", 0),
        (r"(?:,[ \t]*)+(?=[.)\n])", "", 0),
        (r"^([ \t]*[*-])[ \t]*:[ \t]+", r"\1 ", re.M),
        (r"[ \t]*\n[ \t]*([,.;])(?=\s|$)", r"\1\n", 0),
        (r"[ \t]{2,}", " ", 0),
        (r"[ \t]+$", "", re.M),
        (r"\n{3,}", "\n\n", 0),
    )
)


def strip(text: str) -> str:
    """`text` without link, reference and credit boilerplate (the module docstring lists what goes)."""
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text.strip()
