"""Typed records of a benchmark run, serialised in the results file's JSON layout.

A condition is a selection rule (`selection.Method`: sift, nn, nn_f, random) or one of the benchmark's
own conditions (`Label`). Every condition's outcome on one prompt is a `Run`: its steps, its score after
some steps (`curve`, keyed by the step as text, as in the JSON file) and at the end (`final`). A prompt's
runs are a `PromptRuns`; the whole file is a `Results`, whose phases map prompt ids to `PromptRuns`.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, model_serializer, model_validator

from selection.rules import Method


class Label(StrEnum):
    """The benchmark's conditions that are not a selection rule."""

    BASE = "base"
    """The base model, untrained."""
    ADAPTIVE = "adaptive"
    """SIFT with the product's stopping rule (a prefix of SIFT's curve)."""
    ICL_NN = "icl_nn"
    """The base model with NN's picks before the prompt."""
    ICL_SIFT = "icl_sift"
    """The base model with SIFT's picks before the prompt."""
    SIFT_ICL = "sift_icl"
    """SIFT's adapter with its picks before the prompt."""


Condition = Method | Label

CONDITIONS: tuple[Condition, ...] = (
    Label.BASE,
    Method.NN,
    Method.NN_F,
    Method.RANDOM,
    Method.SIFT,
    Label.ADAPTIVE,
    Label.ICL_NN,
    Label.ICL_SIFT,
    Label.SIFT_ICL,
)
"""Every condition, in the order tables list them."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class Score(_Record):
    """Bits per byte of a prompt's continuation (and with `doc_*`, of the whole window) under one model."""

    bpb: float
    bits: float
    bytes: int
    seconds: float | None = None
    """The scoring forward pass (older results files lack it)."""
    context_documents: int | None = None
    """In context: how many documents were placed before the prompt."""
    context_tokens: int | None = None
    """In context: the prompt tokens they added."""
    doc_bpb: float | None = None
    doc_bits: float | None = None
    doc_bytes: int | None = None


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

    def at(self, step: float) -> float:
        """bpb after `step` steps; between two integers, linearly interpolated (a mix of the two)."""
        if self.curve is None:
            raise ValueError(f"{self.label} has no curve")
        lo, hi = math.floor(step), math.ceil(step)
        low, high = self.curve[str(lo)].bpb, self.curve[str(hi)].bpb
        return low + (high - low) * (step - lo)


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


PHASES = ("sweep", "calibration_runs", "reported", "duplicates", "seeds")


class Results(BaseModel):
    """The results file: each phase's runs by prompt id, and what the protocol derived from them."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] = {}
    sweep: dict[str, PromptRuns] = {}
    calibration_runs: dict[str, PromptRuns] = {}
    reported: dict[str, PromptRuns] = {}
    duplicates: dict[str, PromptRuns] = {}
    seeds: dict[str, PromptRuns] = {}
    contamination: dict[str, Any] | None = None
    learning_rate_sweep: dict[str, dict[str, float]] | None = None
    learning_rates: dict[str, float] | None = None
    learning_rate: dict[str, float] | None = None
    calibration: dict[str, Any] | None = None
    prefix_check: dict[str, Any] | None = None
    adaptive_vs_uniform: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None

    def phase(self, name: str) -> dict[str, PromptRuns]:
        return getattr(self, name)

    def all_runs(self) -> list[Run]:
        return [run for name in PHASES for entry in self.phase(name).values() for run in entry.runs.values()]
