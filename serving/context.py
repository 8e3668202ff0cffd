"""In-context retrieval: selected documents placed before the prompt, as many as fit a token budget.

The documents keep their pick order (the most informative first) and are joined by blank lines; a chat
request gets them as a leading system message, a completion as text before the prompt. `fit` finds the
longest prefix of the documents whose rendering adds at most `budget` tokens: the added length grows
with every document, so a bisection over the prefix length needs only log2(n) renderings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

SEPARATOR = "\n\n"
PREAMBLE = "Documents that may help with the request:"


def as_text(documents: Sequence[str]) -> str:
    """The documents as one block of text, ending with a separator (so a prompt can follow directly)."""
    return SEPARATOR.join(documents) + SEPARATOR


def completion_ids(tokenizer, prompt: str, documents: Sequence[str] = ()) -> list[int]:
    """A completion prompt's ids with `documents` (if any) as text before it: the one rendering of
    in-context retrieval for plain text, used by the server and the quality benchmark alike."""
    text = as_text(documents) + prompt if documents else prompt
    return list(tokenizer(text, add_special_tokens=True).input_ids)


def fit(
    documents: Sequence[str], budget: int, render: Callable[[Sequence[str]], list[int]], base: int
) -> tuple[list[int], int]:
    """The prompt ids with the longest prefix of `documents` that adds at most `budget` tokens to a
    `base`-token prompt, and the prefix's length (0: the documents did not fit; the prompt unchanged)."""
    lo, hi = 0, len(documents)  # invariant: the first lo fit; more than hi do not
    best: list[int] | None = None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ids = render(documents[:mid])
        if len(ids) - base <= budget:
            lo, best = mid, ids
        else:
            hi = mid - 1
    return (best if best is not None else render([])), lo
