"""The protocol, phase by phase, each run saved as it finishes (a killed run resumes where it stopped):

0. The pre-registration (endpoints and tests) is written into the results before any run.
1. Recipe: a gain-per-second search on new-knowledge dev prompts (adapted layers x rank x tokens per
   step, SIFT at one rate, `search.steps` steps); the recipe with the most gain per training second wins.
2. Learning rate, per method (SIFT and NN), with that recipe, on the same dev prompts at the horizon; each
   grid is widened past whichever edge is best until the best is interior. The shared rate is the rate
   both grids hold that is best for the two methods together.
3. The stopping rule's threshold, on the dev prompts' SIFT runs at SIFT's rate (`statistics.stopping`).
4. New-knowledge held-out prompts, the primary endpoints first: base, SIFT (scored at the checkpoints),
   in-context retrieval with the documents SIFT trained on (equal documents) and within 520 tokens.
5. Contrast prompts (the older domains): base, SIFT, in context within 520 tokens.
6. New-knowledge prompts at the shared rate: NN, and SIFT where its own rate differs.
7. New-knowledge prompts in context at equal compute: a step's forward and backward cost about three
   forward passes over its tokens, so the tokens trained on, three times over, exceed the context window;
   the condition fills the window with SIFT's picks (at most equal compute).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.corpus.recipes import Group
from benchmarks.quality.config import Config, Recipe
from benchmarks.quality.evaluation import Evaluator
from benchmarks.quality.prompts import Prompt, contamination, groups, load_prompts, per_domain
from benchmarks.quality.records import Label, PromptRuns, Results, Run
from benchmarks.quality.statistics import PREREGISTRATION, choose_rates, choose_recipe, stopping
from infra.config import default_cache_dir
from infra.models import resolve_model
from selection.embed import load_embedder
from selection.index import CorpusIndex
from selection.manifest import IndexManifest
from selection.rules import Method
from selection.selector import Selector

log = logging.getLogger(__name__)


def selectors(index_dirs: Iterable[Path], embedder) -> dict[int, Selector]:
    """A selector per index, keyed by the index's chunk size (tokens per training step)."""
    out = {}
    for directory in index_dirs:
        tokens = IndexManifest.read(directory).chunk_tokens
        out[tokens] = Selector(CorpusIndex.load(directory, embedder), embedder)
    return out


def prompt_sets(args: argparse.Namespace, config: Config, tokenizer) -> tuple[list[Prompt], list[Prompt], list[Prompt]]:
    """(dev, new-knowledge held-out, contrast held-out) prompts: one per family, per source or domain."""
    group = groups(args.corpus)
    need = config.prompt_tokens + config.eval_tokens
    dev = [p for p in load_prompts(args.corpus / "dev.jsonl", tokenizer, need, 1) if group[p.domain] is Group.NEW]
    held = load_prompts(
        args.corpus / "heldout.jsonl",
        tokenizer,
        need,
        max(config.new_prompts_per_source, config.contrast_prompts_per_domain),
    )
    new = per_domain([p for p in held if group[p.domain] is Group.NEW], config.new_prompts_per_source)
    contrast = per_domain([p for p in held if group[p.domain] is Group.CONTRAST], config.contrast_prompts_per_domain)
    return dev[: config.dev_prompts], new, contrast


def run_protocol(results: Results, config: Config, args: argparse.Namespace, save: Callable[[], None]) -> None:
    model_dir = resolve_model(args.model, default_cache_dir())
    embedder = load_embedder("minilm", model_dir)
    by_tokens = selectors(args.index, embedder)
    missing = {r.train_tokens for r in config.search.recipes()} - set(by_tokens)
    if missing:
        raise SystemExit(f"no index with {sorted(missing)}-token chunks among --index {args.index}")
    ev = Evaluator(model_dir, config, args.device)
    ev.remember(results.all_runs())
    dev, new, contrast = prompt_sets(args, config, ev.tokenizer)
    results.groups = {k: str(v) for k, v in groups(args.corpus).items()}
    log.info("%d dev, %d new-knowledge and %d contrast prompts", len(dev), len(new), len(contrast))
    if results.preregistration is None:
        results.preregistration = PREREGISTRATION
        save()
    if results.contamination is None:
        counts = contamination(dev + new + contrast, ev.tokenizer, args.corpus / "train.jsonl", config.prompt_tokens)
        results.contamination = {"shared_13grams": sum(counts.values()), "prompts": len(counts), "per_prompt": counts}
        save()
    if results.contamination["shared_13grams"] != 0:
        raise SystemExit(f"held-out continuations share 13-grams with the train side: {results.contamination}")
    bases: dict[str, Run] = {}

    def base_of(p: Prompt) -> Run:
        if p.id not in bases:
            for phase in ("reported", "sweep", "search"):
                entry = results.phase(phase).get(p.id)
                if entry is not None and Label.BASE in entry:
                    bases[p.id] = entry[Label.BASE]
                    break
            else:
                bases[p.id] = ev.base(p)
        return bases[p.id]

    def entry_of(phase: str, p: Prompt) -> PromptRuns:
        entry = results.phase(phase).setdefault(p.id, PromptRuns(domain=p.domain))
        if Label.BASE not in entry:
            entry[Label.BASE] = base_of(p)
        return entry

    def train_into(
        phase: str, p: Prompt, label: str, method: Method, lr: float, recipe: Recipe, at: Iterable[int], n: int = 0
    ) -> Run:
        entry = entry_of(phase, p)
        if label not in entry:
            selector = by_tokens[recipe.train_tokens]
            entry[label] = ev.run(p, selector, method, lr, at, base_of(p), recipe, steps=n or None)
            save()
        return entry[label]

    # 1. the recipe: gain per training second
    search = config.search
    for recipe in search.recipes():
        for p in tqdm(dev, desc=f"search {recipe.name}"):
            train_into(
                "search", p, recipe.name, Method.SIFT, search.learning_rate, recipe, (search.steps,), search.steps
            )
    results.recipe = choose_recipe(results.search, search)
    save()
    recipe = Recipe.of(results.recipe["chosen"])
    selector = by_tokens[recipe.train_tokens]
    log.info(
        "recipe %s: %.4g bpb per training second", recipe.name, results.recipe["table"][recipe.name]["gain_per_second"]
    )

    # 2. the learning rate per method, widening each grid until its best is interior
    horizon = (*config.checkpoints, config.max_steps)
    grids: dict[str, list[float]] = {}
    for method in (Method.SIFT, Method.NN):
        grid = list(config.learning_rates)
        for widened in range(config.lr_widen + 1):
            for lr in grid:
                for p in tqdm(dev, desc=f"sweep {method} lr {lr:g}"):
                    train_into("sweep", p, f"{method}@{lr:g}", method, lr, recipe, horizon)
            best = choose_rates(results.sweep, {str(method): grid})[str(method)]["best"]
            if widened == config.lr_widen or grid[0] < best < grid[-1]:
                break
            if best == grid[0]:
                grid.insert(0, grid[0] / config.lr_factor)
            else:
                grid.append(grid[-1] * config.lr_factor)
        grids[str(method)] = grid
    results.lr = choose_rates(results.sweep, grids)
    save()
    lr_sift, lr_nn, shared = results.lr["sift"]["best"], results.lr["nn"]["best"], results.lr["shared"]
    log.info("rates: sift %g, nn %g, shared %g", lr_sift, lr_nn, shared)

    # 3. the stopping rule, on the dev prompts' SIFT runs
    results.stopping = stopping([results.sweep[p.id][f"sift@{lr_sift:g}"] for p in dev], config, recipe.train_tokens)
    save()

    def in_context(p: Prompt, label: Label, n: int, budget: int) -> None:
        entry = entry_of("reported", p)
        if label not in entry:
            picked = ev.pick(p, selector, Method.SIFT, n)
            texts, ids = [d.text for d in picked.documents], [d.id for d in picked.documents]
            entry[label] = ev.in_context(p, texts, ids, budget, base_of(p))
            save()

    full = config.model_context - config.prompt_tokens - config.eval_tokens - 64  # the template's tokens
    # 4. new knowledge: the primary endpoints
    for p in tqdm(new, desc="new knowledge"):
        train_into("reported", p, Method.SIFT, Method.SIFT, lr_sift, recipe, horizon)
        in_context(p, Label.ICL_EQUAL_DOCS, config.max_steps, full)
        in_context(p, Label.ICL_SIFT, config.max_steps, config.context_tokens)
    # 5. the contrast group
    for p in tqdm(contrast, desc="contrast"):
        train_into("reported", p, Method.SIFT, Method.SIFT, lr_sift, recipe, horizon)
        in_context(p, Label.ICL_SIFT, config.max_steps, config.context_tokens)
    # 6. SIFT against NN at the shared rate
    for p in tqdm(new, desc="shared rate"):
        train_into("reported", p, Label.NN_SHARED, Method.NN, shared, recipe, horizon)
        train_into("reported", p, Label.SIFT_SHARED, Method.SIFT, shared, recipe, horizon)
    # 7. in context at equal compute: training's FLOPs (3 x the tokens trained on) exceed the window
    for p in tqdm(new, desc="full context"):
        entry = entry_of("reported", p)
        equal = entry[Label.ICL_EQUAL_DOCS]
        if Label.ICL_FULL not in entry and (equal.final.context_documents or 0) < config.max_steps:
            # the window was already full with fewer than the trained-on documents: the same prefix of picks
            entry[Label.ICL_FULL] = equal.model_copy(update={"same_as": str(Label.ICL_EQUAL_DOCS)})
            save()
        in_context(p, Label.ICL_FULL, config.full_context_picks, full)
    results.config = {**results.config, "recipe": asdict(recipe)}
    save()
