"""`Evaluator`: trains one condition's picks for one prompt with the project's `Trainer` and scores the
adapter along the way, as bits per byte of the prompt's continuation.

Scoring uses the trainer's own model: the base model (`trainer.step.use(None)`) or the request's adapter
as trained so far (`trainer.step.use(trainer.slot(request))`, from the request's progress callback). With
documents in the context, the prompt is rendered as the server renders a completion with in-context
retrieval (`serving.context.completion_ids`, as many whole documents as fit `context_tokens`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager

from adapters.spec import TrainRequest, TrainSpec, TrainStep
from adapters.trainer import Trainer
from benchmarks.bpb import continuation_bits
from benchmarks.quality.config import Config
from benchmarks.quality.prompts import Prompt, order_key
from benchmarks.quality.records import Run, Score
from selection.rules import Method
from selection.selector import SelectOptions, Selector
from serving.context import completion_ids, fit


class Evaluator:
    """Trains one method's picks for one prompt and scores the adapter along the way."""

    def __init__(self, trainer: Trainer, config: Config) -> None:
        self.trainer, self.config = trainer, config
        self.tokenizer = trainer.step.tokenizer
        self.runs: dict[str, Run] = {}
        """Runs by training key (prompt, picks, learning rate, seed), for reuse."""

    def base_model(self) -> AbstractContextManager:
        return self.trainer.step.use(None)

    def score(self, prompt: Prompt, view, whole: bool = False, documents: Sequence[str] = ()) -> Score:
        """Bits per byte of the continuation (and with `whole`, of the whole window) under `view`; with
        `documents`, as many of them as fit `context_tokens` are placed before the prompt (the bytes scored
        are the same). `seconds` is the scoring forward pass, `context_tokens` what the documents added."""
        p = self.config.prompt_tokens
        context, continuation = prompt.ids[:p], prompt.ids[p:]
        extra: dict = {}
        if documents:
            text = self.tokenizer.decode(context)

            def render(docs: Sequence[str]) -> list[int]:
                return completion_ids(self.tokenizer, text, docs)

            alone = render(())
            context, added = fit(documents, self.config.context_tokens, render, len(alone))
            extra = {"context_documents": added, "context_tokens": len(context) - len(alone)}
        cont_bytes = len(self.tokenizer.decode(continuation).encode("utf-8"))
        with view as model:
            started = time.monotonic()
            bits = continuation_bits(model, context, continuation)
            seconds = time.monotonic() - started
            if whole:
                prefix = self.tokenizer.bos_token_id
                prefix = self.tokenizer.eos_token_id if prefix is None else prefix
                doc_bits = continuation_bits(model, [prefix], prompt.ids)
                doc_bytes = len(self.tokenizer.decode(prompt.ids).encode("utf-8"))
                extra.update(doc_bpb=doc_bits / doc_bytes, doc_bits=doc_bits, doc_bytes=doc_bytes)
        return Score(bpb=bits / cont_bytes, bits=bits, bytes=cont_bytes, seconds=seconds, **extra)

    def base(self, prompt: Prompt) -> Run:
        score = self.score(prompt, self.base_model(), whole=True)
        return Run(steps=0, curve={"0": score}, final=score)

    def run(
        self,
        prompt: Prompt,
        selector: Selector,
        method: Method,
        learning_rate: float,
        seed: int,
        score_at: Iterable[int],
        base: Run,
        n: int | None = None,
        in_context: bool = False,
    ) -> Run:
        """Select `n` (default `max_steps`) picks with `method`, train on them one step each, score after
        the steps in `score_at` (and the last, with the whole-window view); with `in_context`, also score
        the last adapter with the picks placed before the prompt (`icl`)."""
        text = self.tokenizer.decode(prompt.ids[: self.config.prompt_tokens])
        options = SelectOptions(
            n or self.config.max_steps,
            method,
            lambda_=self.config.lambda_,
            candidates=self.config.candidates,
            seed=seed,
        )
        picked = selector.select([text], options)[0]
        texts = [d.text for d in picked.documents]
        key = order_key(json.dumps([prompt.id, texts, learning_rate, seed, *(["icl"] if in_context else [])]))
        wanted = {s for s in score_at if s <= len(texts)} | {len(texts)}
        reused = self.runs.get(key)
        if reused is not None and reused.curve is not None and wanted <= {int(s) for s in reused.curve}:
            return reused.model_copy(update={"same_as": reused.same_as or reused.label, "label": str(method)})
        started = time.monotonic()
        curve = {"0": base.final}
        icl: dict[str, Score] = {}
        spec = TrainSpec(self.config.max_steps, learning_rate, self.config.train_tokens, time_budget_s=None, seed=seed)
        request = TrainRequest(tuple(texts), spec)

        def after(done: TrainStep) -> None:
            if done.step in wanted:
                view = self.trainer.step.use(self.trainer.slot(request))
                curve[str(done.step)] = self.score(prompt, view, whole=done.step == len(texts))
                if in_context and done.step == len(texts):
                    view = self.trainer.step.use(self.trainer.slot(request))
                    icl[str(done.step)] = self.score(prompt, view, documents=texts)

        result = self.trainer.train(request, progress=after)
        run = Run(
            label=str(method),
            key=key,
            steps=result.steps,
            curve=curve,
            final=curve[str(result.steps)],
            sigma2=picked.sigma2,
            documents=[d.id for d in picked.documents],
            repeats=picked.repeats,
            losses=list(result.losses),
            seconds=time.monotonic() - started,
            train_seconds=result.train_seconds,
            icl=icl[str(result.steps)] if in_context else None,
        )
        self.runs[key] = run
        return run

    def in_context(self, prompt: Prompt, selector: Selector, method: Method, base: Run) -> Run:
        """The base model with `method`'s picks placed before the prompt (in-context retrieval)."""
        text = self.tokenizer.decode(prompt.ids[: self.config.prompt_tokens])
        options = SelectOptions(
            self.config.max_steps, method, lambda_=self.config.lambda_, candidates=self.config.candidates
        )
        picked = selector.select([text], options)[0]
        score = self.score(prompt, self.base_model(), documents=[d.text for d in picked.documents])
        return Run(steps=0, curve={"0": base.final}, final=score, documents=[d.id for d in picked.documents])

    def remember(self, runs: Iterable[Run]) -> None:
        """Make saved runs (from a resumed results file) available for reuse."""
        for run in runs:
            if run.key is not None and run.same_as is None:
                self.runs.setdefault(run.key, run)
