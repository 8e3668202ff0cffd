"""The protocol, phase by phase, each saved as it goes (a killed run resumes where it stopped):

1. Learning rate, per method (SIFT and NN each at its own best), on dev prompts.
2. Calibration of the stopping threshold `min_gain` on dev prompts.
3. Reported prompts: base, SIFT (scored after every step), NN and NN-F (at the checkpoints), adaptive.
4. The duplicate condition (`benchmarks.duplicates`): NN, NN-F and SIFT on an index where a third of the
   chunks appear three times.
5. Random picks, and a second seed for SIFT and NN (seed noise).
6. In-context retrieval: the picks before the prompt, on the base model and on SIFT's adapter.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable

from tqdm.auto import tqdm

from adapters.config import TrainerConfig
from adapters.trainer import Trainer
from benchmarks.duplicates import duplicate_index
from benchmarks.quality.config import Config
from benchmarks.quality.evaluation import Evaluator
from benchmarks.quality.prompts import Prompt, contamination, load_prompts, per_domain
from benchmarks.quality.records import Label, PromptRuns, Results, Run
from benchmarks.quality.statistics import adaptive_steps, adaptive_vs_uniform, calibrate, pooled_bpb
from infra.config import default_cache_dir
from infra.models import resolve_model
from selection.embed import load_embedder
from selection.index import CorpusIndex
from selection.rules import Method
from selection.selector import SelectOptions, Selector

log = logging.getLogger(__name__)


def run_protocol(results: Results, config: Config, args: argparse.Namespace, save: Callable[[], None]) -> None:
    model_dir = resolve_model(args.model, default_cache_dir())
    embedder = load_embedder("minilm", model_dir)
    selector = Selector(CorpusIndex.load(args.index, embedder), embedder)
    trainer = Trainer(model_dir, TrainerConfig(rank=config.rank, device=args.device))
    tok = trainer.step.tokenizer
    ev = Evaluator(trainer, config)
    ev.remember(results.all_runs())
    need = config.prompt_tokens + config.eval_tokens
    dev = load_prompts(args.corpus / "dev.jsonl", tok, need, config.dev_prompts_per_domain)
    reported = load_prompts(args.corpus / "heldout.jsonl", tok, need, config.prompts_per_domain)
    log.info("%d reported prompts, %d dev prompts", len(reported), len(dev))
    if results.contamination is None:
        counts = contamination(reported, tok, args.corpus / "train.jsonl", config.prompt_tokens)
        results.contamination = {"shared_13grams": sum(counts.values()), "prompts": len(counts), "per_prompt": counts}
        save()
    if results.contamination["shared_13grams"] != 0:
        raise SystemExit(f"held-out continuations share 13-grams with the train side: {results.contamination}")
    ends = {"sweep": (config.max_steps,), "curve": config.checkpoints, "every": range(1, config.max_steps + 1)}
    bases: dict[str, Run] = {}

    def base_of(p: Prompt) -> Run:
        if p.id not in bases:
            entry = results.reported.get(p.id)
            bases[p.id] = entry[Label.BASE] if entry is not None and Label.BASE in entry else ev.base(p)
        return bases[p.id]

    def entry_of(phase: str, p: Prompt) -> PromptRuns:
        return results.phase(phase).setdefault(p.id, PromptRuns(domain=p.domain))

    def run_into(
        phase: str, p: Prompt, label: str, method: Method, lr: float, seed: int, at_steps: Iterable[int], sel=selector
    ) -> Run:
        entry = entry_of(phase, p)
        if label not in entry:
            entry[label] = ev.run(p, sel, method, lr, seed, at_steps, base_of(p))
            save()
        return entry[label]

    # 1. learning rate per method, on dev prompts
    sweep_prompts = dev[: config.sweep_prompts]
    if results.learning_rates is None:
        for method in (Method.SIFT, Method.NN):
            for lr in config.learning_rates:
                for p in tqdm(sweep_prompts, desc=f"sweep {method} lr {lr:g}"):
                    run_into("sweep", p, f"{method}@{lr:g}", method, lr, 0, ends["sweep"])
        table = {
            str(m): {
                f"{lr:g}": pooled_bpb(
                    [results.sweep[p.id].runs[f"{m}@{lr:g}"] for p in sweep_prompts], lambda r: r.final
                )
                for lr in config.learning_rates
            }
            for m in (Method.SIFT, Method.NN)
        }
        results.learning_rate_sweep = table
        results.learning_rates = {m: float(min(row, key=lambda k: row[k])) for m, row in table.items()}
        save()
    lrs = results.learning_rates
    results.learning_rate = lrs
    log.info("learning rates %s (sweep %s)", lrs, results.learning_rate_sweep)

    # 2. the stopping threshold, on dev prompts
    for p in tqdm(dev, desc="calibration"):
        run_into("calibration_runs", p, Method.SIFT, Method.SIFT, lrs["sift"], 0, ends["every"])
    results.calibration = calibrate([results.calibration_runs[p.id][Method.SIFT] for p in dev], config)
    min_gain = results.calibration["min_gain"]
    save()
    log.info("calibrated min_gain %.4g (%s)", min_gain, {k: v for k, v in results.calibration.items() if k != "grid"})

    # 3. reported prompts
    for p in tqdm(reported, desc="reported"):
        entry = entry_of("reported", p)
        if Label.BASE not in entry:
            entry[Label.BASE] = base_of(p)
        run_into("reported", p, Method.SIFT, Method.SIFT, lrs["sift"], 0, ends["every"])
        run_into("reported", p, Method.NN, Method.NN, lrs["nn"], 0, ends["curve"])
        run_into("reported", p, Method.NN_F, Method.NN_F, lrs["nn"], 0, ends["curve"])
        if Label.ADAPTIVE not in entry:
            entry[Label.ADAPTIVE] = adaptive_run(selector, tok, p, entry[Method.SIFT], min_gain, config)
            save()
    first = next((p for p in reported if results.reported[p.id][Label.ADAPTIVE].steps > 0), reported[0])
    if results.prefix_check is None:
        results.prefix_check = prefix_check(
            ev, selector, first, results.reported[first.id], lrs["sift"], base_of(first)
        )
        save()
    results.adaptive_vs_uniform = adaptive_vs_uniform(results.reported, config)
    save()

    # 4. the duplicate condition
    dup_dir = args.index.with_name(args.index.name + "-duplicated")
    if not (dup_dir / "manifest.json").exists():
        duplicate_index(args.index, dup_dir)
    dup_selector = Selector(CorpusIndex.load(dup_dir, embedder), embedder)
    for p in tqdm(per_domain(reported, config.duplicate_prompts_per_domain), desc="duplicates"):
        for method, lr in ((Method.NN, lrs["nn"]), (Method.NN_F, lrs["nn"]), (Method.SIFT, lrs["sift"])):
            run = run_into("duplicates", p, method, method, lr, 0, ends["curve"], dup_selector)
            if run.distinct_texts is None:
                run.distinct_texts = len({d.split("#copy")[0] for d in run.documents or []})
                save()

    # 5. random picks, and a second seed
    for p in tqdm(per_domain(reported, config.random_prompts_per_domain), desc="random"):
        run_into("reported", p, Method.RANDOM, Method.RANDOM, lrs["sift"], 0, ends["sweep"])
    for p in tqdm(per_domain(reported, config.seed_prompts_per_domain), desc="seed 1"):
        run_into("seeds", p, Method.SIFT, Method.SIFT, lrs["sift"], 1, ends["sweep"])
        run_into("seeds", p, Method.NN, Method.NN, lrs["nn"], 1, ends["sweep"])

    # 6. in-context retrieval: the picks before the prompt, on the base model and on the adapted one
    for p in tqdm(reported, desc="in context"):
        entry = results.reported[p.id]
        for label, method in ((Label.ICL_NN, Method.NN), (Label.ICL_SIFT, Method.SIFT)):
            if label not in entry:
                entry[label] = ev.in_context(p, selector, method, base_of(p))
                save()
        if entry.plain_seconds is None:
            entry.plain_seconds = ev.score(p, ev.base_model()).seconds
        if Label.SIFT_ICL not in entry:
            run = ev.run(p, selector, Method.SIFT, lrs["sift"], 0, ends["sweep"], base_of(p), in_context=True)
            assert run.icl is not None
            entry[Label.SIFT_ICL] = run.model_copy(update={"final": run.icl})
            save()


def adaptive_run(selector: Selector, tokenizer, prompt: Prompt, sift: Run, min_gain: float, config: Config) -> Run:
    """The product's predicted-gain rule on this prompt: its steps, and SIFT's score after that many."""
    text = tokenizer.decode(prompt.ids[: config.prompt_tokens])
    options = SelectOptions(
        config.max_steps,
        lambda_=config.lambda_,
        candidates=config.candidates,
        min_gain=min_gain,
        step_tokens=config.train_tokens,
    )
    picked = selector.select([text], options)[0]
    steps = len(picked.documents)
    ids = [d.id for d in picked.documents]
    if ids != (sift.documents or [])[:steps]:
        raise RuntimeError(f"{prompt.id}: adaptive picks {ids} are not a prefix of SIFT's {sift.documents}")
    derived = adaptive_steps(sift.sigma2 or [], min_gain, config.train_tokens, config.max_steps)
    if derived != steps:  # only where a gain sits within float32 rounding of the threshold
        log.warning("%s: the selector stopped after %d steps, the variance trace says %d", prompt.id, steps, derived)
    assert sift.curve is not None
    return Run(steps=steps, trace_steps=derived, stop_reason=str(picked.stop_reason), final=sift.curve[str(steps)])


def prefix_check(ev: Evaluator, selector: Selector, prompt: Prompt, entry: PromptRuns, lr: float, base: Run) -> dict:
    """Train one prompt's adaptive picks on their own and compare with SIFT's curve at that step: the
    reuse of SIFT's curve for adaptive and uniform steps rests on this equality."""
    steps = entry[Label.ADAPTIVE].steps
    if steps == 0:
        return {"prompt": prompt.id, "steps": 0, "abs_diff": 0.0}
    alone = ev.run(prompt, selector, Method.SIFT, lr, 0, (steps,), base, n=steps)
    sift = entry[Method.SIFT]
    return {
        "prompt": prompt.id,
        "steps": steps,
        "abs_diff": abs(alone.final.bpb - sift.at(steps)),
        "same_picks": alone.documents == (sift.documents or [])[:steps],
    }
