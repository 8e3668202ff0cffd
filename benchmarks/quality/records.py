"""Typed records of a benchmark run, serialised in the results file's JSON layout.

A condition is a selection rule (`selection.Method`: sift, nn, nn_f, random) or one of the benchmark's
own conditions (`Label`). Every condition's outcome on one prompt is a `Run`: its steps, its score after
some steps (`curve`, keyed by the step as text, as in the JSON file) and at the end (`final`). A prompt's
runs are a `PromptRuns`; the whole file is a `Results`, whose phases map prompt ids to `PromptRuns`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, model_serializer, model_validator

from selection.rules import Method


class Label(StrEnum):
    """The benchmark's conditions that are not a selection rule at its tuned rate."""

    BASE = "base"
    """The base model, untrained."""
    SIFT_SHARED = "sift_shared"
    """SIFT at the rate shared with NN (the same run as `sift` where the two rates agree)."""
    NN_SHARED = "nn_shared"
    """Nearest neighbours at the shared rate."""
    ICL_SIFT = "icl_sift"
    """The base model with SIFT's picks before the prompt, within the previous run's 520-token budget."""
    ICL_EQUAL_DOCS = "icl_equal_docs"
    """The base model with the documents the adapter trained on before the prompt (equal documents)."""
    ICL_FULL = "icl_full_context"
    """The base model with as many of SIFT's picks as the context window holds (at most equal compute)."""


Condition = Method | Label

CONDITIONS: tuple[Condition, ...] = (
    Label.BASE,
    Method.SIFT,
    Label.SIFT_SHARED,
    Label.NN_SHARED,
    Label.ICL_SIFT,
    Label.ICL_EQUAL_DOCS,
    Label.ICL_FULL,
)
"""Every condition of a reported prompt, in the order tables list them."""
IN_CONTEXT = (Label.ICL_SIFT, Label.ICL_EQUAL_DOCS, Label.ICL_FULL)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class Score(_Record):
    """Bits per byte of a prompt's continuation under one model."""

    bpb: float
    bits: float
    bytes: int
    seconds: float | None = None
    """The scoring forward pass (older results files lack it)."""
    context_documents: int | None = None
    """In context: how many documents were placed before the prompt."""
    context_tokens: int | None = None
    """In context: the prompt tokens they added."""
    content_bpb: float | None = None
    """Bits per byte over the continuation's content tokens only (those with a letter in them)."""
    content_bits: float | None = None
    content_bytes: int | None = None


class Run(_Record):
    """One condition on one prompt."""

    steps: int
    final: Score
    curve: dict[str, Score] | None = None
    """Scores after some steps (adaptive runs have none: they are a point on SIFT's curve)."""
    label: str | None = None
    key: str | None = None
    """The training inputs' hash: identical inputs are trained once and reused (`same_as`)."""
    same_as: str | None = None
    sigma2: list[float] | None = None
    documents: list[str] | None = None
    repeats: int | None = None
    losses: list[float] | None = None
    seconds: float | None = None
    train_seconds: float | None = None
    icl: Score | None = None
    distinct_texts: int | None = None
    trace_steps: int | None = None
    """Adaptive: the steps the variance trace implies (equals `steps` but for float rounding)."""
    stop_reason: str | None = None

    def at(self, step: float, content: bool = False) -> float:
        """bpb (or content bpb) after `step` steps, linearly interpolated between the scored steps around
        it (a fractional step is a mix of two step counts)."""
        if self.curve is None:
            raise ValueError(f"{self.label} has no curve")
        scored = sorted(int(s) for s in self.curve)
        if not scored[0] <= step <= scored[-1]:
            raise ValueError(f"step {step} outside the scored range {scored[0]}..{scored[-1]}")
        hi = next(s for s in scored if s >= step)
        lo = max(s for s in scored if s <= step)

        def value(s: int) -> float:
            score = self.curve[str(s)]  # type: ignore[index]
            if content:
                assert score.content_bpb is not None
                return score.content_bpb
            return score.bpb

        return value(lo) if hi == lo else value(lo) + (value(hi) - value(lo)) * (step - lo) / (hi - lo)


class PromptRuns(BaseModel):
    """Every condition's run on one prompt (flat in the JSON file: `domain`, then one key per condition)."""

    model_config = ConfigDict(extra="forbid")

    domain: str
    runs: dict[str, Run] = {}
    plain_seconds: float | None = None
    """The scoring pass of the base model without documents (the in-context phase's cost reference)."""

    @model_validator(mode="before")
    @classmethod
    def _gather(cls, data: Any) -> Any:
        if isinstance(data, dict) and "runs" not in data:
            own = {"domain", "plain_seconds"}
            data = {
                **{k: v for k, v in data.items() if k in own},
                "runs": {k: v for k, v in data.items() if k not in own},
            }
        return data

    @model_serializer(mode="plain")
    def _flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {"domain": self.domain, **{k: r.model_dump() for k, r in self.runs.items()}}
        if self.plain_seconds is not None:
            out["plain_seconds"] = self.plain_seconds
        return out

    def __contains__(self, condition: object) -> bool:
        return condition in self.runs

    def __getitem__(self, condition: str) -> Run:
        """The run of a condition (a `Method` or `Label`; sweep runs are `<method>@<learning rate>`)."""
        return self.runs[condition]

    def __setitem__(self, condition: str, run: Run) -> None:
        self.runs[str(condition)] = run


PHASES = ("search", "sweep", "reported")


class Results(BaseModel):
    """The results file: each phase's runs by prompt id, and what the protocol derived from them."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] = {}
    preregistration: dict[str, Any] | None = None
    """The endpoints and tests, written before the first run (`statistics.PREREGISTRATION`)."""
    search: dict[str, PromptRuns] = {}
    """Dev prompts, one SIFT run per recipe (`<layers>/r<rank>/<tokens>t`)."""
    sweep: dict[str, PromptRuns] = {}
    """Dev prompts, one run per method and rate (`<method>@<rate>`), with the chosen recipe."""
    reported: dict[str, PromptRuns] = {}
    """Held-out prompts, new knowledge and contrast."""
    groups: dict[str, str] = {}
    """Each domain's group (new_knowledge or contrast)."""
    contamination: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None
    """The search's outcome: every recipe's gain and seconds, and the one chosen."""
    lr: dict[str, Any] | None = None
    """Per method the grid, its pooled bpb, the best rate; and the shared rate."""
    stopping: dict[str, Any] | None = None
    """The stopping rule's calibration on dev prompts, and the diagnosis of the previous rule."""
    summary: dict[str, Any] | None = None

    def phase(self, name: str) -> dict[str, PromptRuns]:
        return getattr(self, name)

    def all_runs(self) -> list[Run]:
        return [run for name in PHASES for entry in self.phase(name).values() for run in entry.runs.values()]
