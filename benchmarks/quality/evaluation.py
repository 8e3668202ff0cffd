"""`Evaluator`: trains one condition's picks for one prompt with the project's `Trainer` and scores the
adapter along the way, as bits per byte of the prompt's continuation (all of it, and its content tokens).

Scoring uses the trainer's own model: the base model (`trainer.step.use(None)`) or the request's adapter
as trained so far (`trainer.step.use(trainer.slot(request))`, from the request's progress callback). With
documents in the context, the prompt is rendered as the server renders a completion with in-context
retrieval (`serving.context.completion_ids`, as many whole documents as fit the budget). One `Trainer`
per recipe (rank and adapted layers) is loaded when first needed; tokens per step are the index's chunks.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager

from adapters.config import TrainerConfig
from adapters.handle import AdapterBlob
from adapters.spec import TrainRequest, TrainSpec, TrainStep
from adapters.trainer import Trainer
from benchmarks.bpb import continuation_token_bits
from benchmarks.quality.config import Config, Recipe
from benchmarks.quality.prompts import Prompt, order_key
from benchmarks.quality.records import Run, Score
from selection.rules import Method
from selection.selector import SelectOptions, Selector
from serving.context import completion_ids, fit


def content_mask(tokenizer, ids: Sequence[int]) -> list[bool]:
    """Which tokens carry content: those whose text has a letter (not whitespace, punctuation, markup or
    digits alone)."""
    return [any(ch.isalpha() for ch in tokenizer.decode([i])) for i in ids]


class Evaluator:
    """Trains one method's picks for one prompt and scores the adapter along the way."""

    def __init__(self, model_dir, config: Config, device: str = "cpu") -> None:
        self.model_dir, self.config, self.device = model_dir, config, device
        self._trainers: dict[tuple[str, int], Trainer] = {}
        self.runs: dict[str, Run] = {}
        """Runs by training key (prompt, picks, rate, seed, recipe), for reuse."""
        self.tokenizer = self.trainer(Recipe()).step.tokenizer

    def trainer(self, recipe: Recipe) -> Trainer:
        """The trainer for `recipe`'s adapter shape (one loaded at a time: the model is freed in between)."""
        key = (str(recipe.layers), recipe.rank)
        if key not in self._trainers:
            self._trainers.clear()
            config = TrainerConfig(rank=recipe.rank, layers=recipe.layers, device=self.device, max_batch=1)
            self._trainers[key] = Trainer(self.model_dir, config)
        return self._trainers[key]

    def base_model(self) -> AbstractContextManager:
        return next(iter(self._trainers.values())).step.use(None)

    def score(self, prompt: Prompt, view, documents: Sequence[str] = (), budget: int = 0) -> Score:
        """Bits per byte of the continuation under `view`, over all its bytes and over its content tokens'
        bytes. With `documents`, as many of them as fit `budget` prompt tokens are placed before the prompt
        (the bytes scored are the same). `seconds` is the scoring forward pass, `context_tokens` what the
        documents added."""
        p = self.config.prompt_tokens
        context, continuation = list(prompt.ids[:p]), list(prompt.ids[p:])
        extra: dict = {}
        if documents:
            text = self.tokenizer.decode(context)

            def render(docs: Sequence[str]) -> list[int]:
                return completion_ids(self.tokenizer, text, docs)

            alone = render(())
            context, added = fit(documents, budget, render, len(alone))
            extra = {"context_documents": added, "context_tokens": len(context) - len(alone)}
        mask = content_mask(self.tokenizer, continuation)
        with view as model:
            started = time.monotonic()
            bits = continuation_token_bits(model, context, continuation)
            seconds = time.monotonic() - started
        cont_bytes = len(self.tokenizer.decode(continuation).encode("utf-8"))
        content_bits = sum(b for b, keep in zip(bits, mask, strict=True) if keep)
        content_bytes = sum(
            len(self.tokenizer.decode([i]).encode("utf-8")) for i, keep in zip(continuation, mask, strict=True) if keep
        )
        return Score(
            bpb=sum(bits) / cont_bytes,
            bits=sum(bits),
            bytes=cont_bytes,
            seconds=seconds,
            content_bpb=content_bits / content_bytes,
            content_bits=content_bits,
            content_bytes=content_bytes,
            **extra,
        )

    def base(self, prompt: Prompt) -> Run:
        score = self.score(prompt, self.base_model())
        return Run(steps=0, curve={"0": score}, final=score)

    def pick(self, prompt: Prompt, selector: Selector, method: Method, n: int, seed: int = 0):
        """`method`'s first `n` picks for the prompt, from the same candidates for every method."""
        text = self.tokenizer.decode(prompt.ids[: self.config.prompt_tokens])
        options = SelectOptions(n, method, lambda_=self.config.lambda_, candidates=self.config.candidates, seed=seed)
        return selector.select([text], options)[0]

    def run(
        self,
        prompt: Prompt,
        selector: Selector,
        method: Method,
        learning_rate: float,
        score_at: Iterable[int],
        base: Run,
        recipe: Recipe,
        steps: int | None = None,
        seed: int = 0,
        initial: AdapterBlob | None = None,
    ) -> Run:
        """Select `steps` (default the horizon) picks with `method`, train on them one step each with
        `recipe` (from `initial`'s weights when given: `base` is then that adapter's run), and score after
        the steps in `score_at` and the last. `seconds` is the training's wall time without the scoring."""
        picked = self.pick(prompt, selector, method, steps or self.config.max_steps, seed)
        texts = [d.text for d in picked.documents]
        start = hashlib.sha256(initial.weights).hexdigest() if initial is not None else None
        key = order_key(json.dumps([prompt.id, texts, learning_rate, seed, recipe.name, *([start] if start else [])]))
        wanted = {s for s in score_at if s <= len(texts)} | {len(texts)}
        reused = self.runs.get(key)
        if reused is not None and reused.curve is not None and wanted <= {int(s) for s in reused.curve}:
            return reused.model_copy(update={"same_as": reused.same_as or reused.label, "label": str(method)})
        trainer = self.trainer(recipe)
        started = time.monotonic()
        curve = {"0": base.final}
        spec = TrainSpec(len(texts), learning_rate, recipe.train_tokens, time_budget_s=None, seed=seed)
        request = TrainRequest(tuple(texts), spec, initial=initial)
        scoring = 0.0

        def after(done: TrainStep) -> None:
            nonlocal scoring
            if done.step in wanted:
                entered = time.monotonic()
                view = trainer.step.use(trainer.slot(request))
                curve[str(done.step)] = self.score(prompt, view)
                scoring += time.monotonic() - entered

        result = trainer.train(request, progress=after)
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
            seconds=time.monotonic() - started - scoring,
        )
        self.runs[key] = run
        return run

    def adapter(self, prompt: Prompt, adapter: AdapterBlob, recipe: Recipe) -> Score:
        """The score of a finished adapter (a merge of experts), loaded into `recipe`'s trainer (its rank
        must hold the adapter's)."""
        step = self.trainer(recipe).step
        step.reset(0, seed=0, learning_rate=1.0, initial=adapter)
        return self.score(prompt, step.use(0))

    def in_context(self, prompt: Prompt, texts: Sequence[str], ids: Sequence[str], budget: int, base: Run) -> Run:
        """The base model with `texts` (as many as fit `budget` prompt tokens) placed before the prompt."""
        score = self.score(prompt, self.base_model(), documents=texts, budget=budget)
        used = list(ids[: score.context_documents or 0])
        return Run(steps=0, curve={"0": base.final}, final=score, documents=used)

    def remember(self, runs: Iterable[Run]) -> None:
        """Make saved runs (from a resumed results file) available for reuse."""
        for run in runs:
            if run.key is not None and run.same_as is None:
                self.runs.setdefault(run.key, run)
