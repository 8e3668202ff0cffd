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
from selection.select import select_batch
from selection.shards import ShardedIndex
from selection.stopping import StopReason, step_threshold


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


@dataclass(frozen=True)
class SelectionResult:
    documents: list[PickedDocument]
    sigma2: list[float]
    """Prior variance first, then after each pick."""
    stop_reason: StopReason
    method: str
    candidates: int
    repeats: int

    def to_dict(self) -> dict:
        """Everything but the documents' texts (for printing)."""
        out = asdict(self)
        for doc in out["documents"]:
            doc.pop("text")
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
        n: int,
        method: str = "sift",
        lambda_: float = 0.01,
        alpha: float | None = None,
        candidates: int = 200,
        seed: int = 0,
        min_gain: float | None = None,
        step_tokens: int = 1000,
    ) -> list[SelectionResult]:
        """Pick up to `n` documents for each prompt among its `candidates` nearest by |cos|; stop early where
        a step of `step_tokens` tokens no longer removes `min_gain` of the prompt's uncertainty per 1,000
        tokens, or by the paper's `alpha` rule (`selection.stopping`)."""
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("every prompt must be a non-empty string")
        if candidates <= 0:
            raise ValueError(f"candidates must be positive, got {candidates}")
        queries = self.embedder.embed(list(prompts))
        found = self.index.search(queries, candidates)
        targets, cand_sets, row_sets = [], [], []
        for b in range(len(prompts)):
            valid = found.rows[b] >= 0
            rows = found.rows[b][valid]
            targets.append(torch.from_numpy(queries[b]).to(self.device))
            cand_sets.append(torch.from_numpy(np.ascontiguousarray(found.vectors[b][valid])).to(self.device))
            row_sets.append(rows)
        # NN-F's duplicates are identical texts, recognised by the store's text hashes.
        keys = [[c.hash for c in self.index.chunks(rows)] for rows in row_sets] if method == "nn_f" else None
        selections = select_batch(
            targets,
            cand_sets,
            n,
            method=method,
            lambda_=lambda_,
            alpha=alpha,
            min_step_gain=None if min_gain is None else step_threshold(min_gain, step_tokens),
            keys=keys,
            seed=seed,
        )
        results = []
        for b, sel in enumerate(selections):
            picks = sel.indices.tolist()
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
                    sigma2=float(sel.sigma2[i + 1]),
                    text=c.text,
                )
                for i, c in enumerate(chunks)
            ]
            results.append(
                SelectionResult(
                    documents=documents,
                    sigma2=sel.sigma2.tolist(),
                    stop_reason=sel.stop_reason,
                    method=method,
                    candidates=len(row_sets[b]),
                    repeats=sel.repeats,
                )
            )
        return results
