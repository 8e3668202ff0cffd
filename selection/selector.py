"""`Selector`: prompt texts in, the documents to train on out (embed -> Faiss top-K by |cos| -> SIFT).

A plain object that loads the embedder and the index once and answers many requests; the serving layer
wraps it in a Ray Serve deployment, the CLI calls it directly. Prompts are selected for in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from infra.config import resolve_device
from selection.embed import Embedder
from selection.index import CorpusIndex
from selection.rules import Method
from selection.select import select_batch
from selection.shards import ShardedIndex
from selection.stopping import StopReason, budget_steps, step_threshold


@dataclass(frozen=True)
class SelectOptions:
    """How documents are picked for a prompt. Hashable: prompts with equal options are selected in one batch."""

    n: int
    """Most documents picked."""
    method: Method = Method.SIFT
    lambda_: float = 0.01
    alpha: float | None = None
    """The paper's rule: stop once sigma_n > 1 / (alpha n)."""
    candidates: int = 200
    """K: the documents nearest the prompt by |cos| that the rule picks from."""
    min_gain: float | None = None
    """Stop once a step no longer removes this share of the prompt's uncertainty per 1,000 tokens."""
    step_tokens: int = 1000
    """Tokens one step trains on at most: the compute `min_gain` prices."""
    gain_budget: float | None = None
    """The gain-budget rule: of the `n` picks, keep the first n* while V log(1 + 1/n*) >= this, V being the
    share of the prompt's uncertainty all `n` remove (`selection.stopping.budget_steps`)."""
    seed: int = 0
    """Drives the `random` rule."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Method.parse(self.method))
        if self.candidates <= 0:
            raise ValueError(f"candidates must be positive, got {self.candidates}")
        if self.step_tokens <= 0:
            raise ValueError(f"step_tokens must be positive, got {self.step_tokens}")


@dataclass(frozen=True)
class GivenDocument:
    """A document already selected for this prompt's conversation (an adapter was trained on it): its index
    row and its embedding, so that selection conditions on it."""

    row: int
    vector: tuple[float, ...]


@dataclass(frozen=True)
class PickedDocument:
    rank: int
    row: int
    id: str
    doc_id: str
    source: str
    title: str
    similarity: float
    """cos(prompt, document) as embedded (signed)."""
    sigma2: float
    """Posterior variance of the prompt after this pick."""
    text: str
    vector: tuple[float, ...] = ()
    """The document's embedding (what a later turn conditions on)."""

    def given(self) -> GivenDocument:
        return GivenDocument(self.row, self.vector)


@dataclass(frozen=True)
class SelectionResult:
    documents: list[PickedDocument]
    sigma2: list[float]
    """Prior variance first, then after each pick."""
    stop_reason: StopReason
    method: Method
    candidates: int
    repeats: int

    def to_dict(self) -> dict:
        """Everything but the documents' texts and vectors (for printing)."""
        out = asdict(self)
        for doc in out["documents"]:
            doc.pop("text")
            doc.pop("vector")
        return out


class Selector:
    """Chooses training documents for prompts from one corpus index (whole, or in shards)."""

    def __init__(self, index: CorpusIndex | ShardedIndex, embedder: Embedder, device: str = "cpu") -> None:
        if index.dim != embedder.dim:
            raise ValueError(f"index is {index.dim}-d but the embedder gives {embedder.dim}-d vectors")
        self.index = index
        self.embedder = embedder
        self.device = resolve_device(device)

    def select(
        self,
        prompts: Sequence[str],
        options: SelectOptions,
        given: Sequence[Sequence[GivenDocument]] | None = None,
    ) -> list[SelectionResult]:
        """Pick up to `options.n` documents for each prompt among its `options.candidates` nearest by |cos|;
        stop early where a step no longer pays for itself (`options.min_gain`), by the paper's `alpha`
        rule, or where the prompt's predicted gain does not justify more steps (`options.gain_budget`;
        `selection.stopping`). Each rule that is set may stop; the earliest stop wins. With `given` (per
        prompt), selection conditions on those documents first (a conversation's earlier picks): the picks
        are what is still informative given them, and the variance trace starts after them."""
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("every prompt must be a non-empty string")
        queries = self.embedder.embed(list(prompts))
        found = self.index.search(queries, options.candidates)
        given = given if given is not None else [()] * len(prompts)
        targets, cand_sets, row_sets = [], [], []
        for b in range(len(prompts)):
            valid = found.rows[b] >= 0
            earlier = np.array([g.vector for g in given[b]], dtype=found.vectors.dtype).reshape(-1, self.index.dim)
            rows = np.concatenate([np.array([g.row for g in given[b]], dtype=found.rows.dtype), found.rows[b][valid]])
            vectors = np.concatenate([earlier, found.vectors[b][valid]])
            targets.append(torch.from_numpy(queries[b]).to(self.device))
            cand_sets.append(torch.from_numpy(np.ascontiguousarray(vectors)).to(self.device))
            row_sets.append(rows)
        # NN-F's duplicates are identical texts, recognised by the store's text hashes.
        keys = None
        if options.method is Method.NN_F:
            keys = [[c.hash for c in self.index.chunks(rows)] for rows in row_sets]
        selections = select_batch(
            targets,
            cand_sets,
            options.n,
            method=options.method,
            lambda_=options.lambda_,
            alpha=options.alpha,
            min_step_gain=None if options.min_gain is None else step_threshold(options.min_gain, options.step_tokens),
            keys=keys,
            seed=options.seed,
            given=[len(g) for g in given],
        )
        results = []
        for b, sel in enumerate(selections):
            picks, trace, reason = sel.indices.tolist(), sel.sigma2.tolist(), sel.stop_reason
            if options.gain_budget is not None:
                whole = float(targets[b] @ targets[b]) if given[b] else None  # before the earlier turns' documents
                granted = budget_steps(trace, options.gain_budget, options.n, whole)
                if granted < len(picks):
                    picks, trace, reason = picks[:granted], trace[: granted + 1], StopReason.GAIN_BUDGET
            chunks = self.index.chunks(row_sets[b][picks]) if picks else []
            sims = (cand_sets[b][picks] @ targets[b]).tolist() if picks else []
            documents = [
                PickedDocument(
                    rank=i + 1,
                    row=c.row,
                    id=c.id,
                    doc_id=c.doc_id,
                    source=c.source,
                    title=c.title,
                    similarity=float(sims[i]),
                    sigma2=float(trace[i + 1]),
                    text=c.text,
                    vector=tuple(cand_sets[b][picks[i]].tolist()),
                )
                for i, c in enumerate(chunks)
            ]
            results.append(
                SelectionResult(
                    documents=documents,
                    sigma2=trace,
                    stop_reason=reason,
                    method=options.method,
                    candidates=len(row_sets[b]) - len(given[b]),
                    repeats=sel.repeats,
                )
            )
        return results
