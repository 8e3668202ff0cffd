"""Quality benchmark: does test-time fine-tuning on SIFT's picks beat nearest neighbours? (DESIGN.md 8)

For held-out documents of the multi-domain corpus (`benchmarks.corpus.build`): prompt = the first P
tokens, evaluation = the next E tokens, scored as bits per byte of the continuation given the prompt, and
(second view) of the whole P + E window. Every method trains a fresh adapter with the project's `Trainer`
on its own picks from the same K candidates (the index over the training split), with the same seed, and
is scored after 1, 2, 5, 10, ... steps: base (no training), NN, NN-F, uncertainty sampling, random,
SIFT (lambda' = 0.01 and a sweep), adaptive SIFT (a few alpha). The LoRA learning rate is chosen first
by a sweep on held-out prompts outside the reported set. Results are saved after every prompt, so a
killed run resumes where it stopped.

    python -m benchmarks.quality --config cpu --corpus DIR --index DIR [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from adapters.config import TrainerConfig
from adapters.trainer import Trainer, TrainRequest, TrainStep
from benchmarks.bpb import continuation_bits
from infra.config import default_cache_dir
from infra.models import resolve_model
from selection.embed import load_embedder
from selection.index import CorpusIndex
from selection.selector import Selector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    name: str
    rule: str | None  # None: the base model, no training
    lambda_: float = 0.01
    alpha: float | None = None


@dataclass(frozen=True)
class Config:
    prompt_tokens: int
    eval_tokens: int
    train_tokens: int
    max_steps: int
    checkpoints: tuple[int, ...]
    prompts_per_domain: int | None  # None: every held-out document long enough
    sweep_prompts: int
    learning_rates: tuple[float, ...]
    candidates: int = 200
    rank: int = 16
    methods: tuple[Method, ...] = field(
        default=(
            Method("base", None),
            Method("nn", "nn"),
            Method("nn_f", "nn_f"),
            Method("uncertainty", "uncertainty"),
            Method("random", "random"),
            Method("sift", "sift"),
            Method("sift_lambda_0.1", "sift", lambda_=0.1),
            Method("sift_lambda_1", "sift", lambda_=1.0),
            Method("adaptive_sift", "sift", alpha=0.5),
            Method("adaptive_sift_alpha_1", "sift", alpha=1.0),
        )
    )


CONFIGS = {
    "cpu": Config(
        prompt_tokens=128,
        eval_tokens=128,
        train_tokens=128,
        max_steps=10,
        checkpoints=(1, 2, 5, 10),
        prompts_per_domain=2,
        sweep_prompts=3,
        learning_rates=(1e-4, 5e-4, 2e-3),
    ),
    "paper": Config(
        prompt_tokens=512,
        eval_tokens=512,
        train_tokens=1024,
        max_steps=50,
        checkpoints=(1, 2, 5, 10, 20, 50),
        prompts_per_domain=None,
        sweep_prompts=10,
        learning_rates=(5e-5, 1e-4, 5e-4, 1e-3),
    ),
}


def _order(doc_id: str) -> str:
    return hashlib.sha256(doc_id.encode("utf-8")).hexdigest()


def prompts(heldout: Path, tokenizer, config: Config) -> tuple[list[dict], list[dict]]:
    """Reported prompts (per domain) and learning-rate sweep prompts (outside them), in a stable order."""
    need = config.prompt_tokens + config.eval_tokens
    by_domain: dict[str, list[dict]] = {}
    for line in heldout.read_text().splitlines():
        doc = json.loads(line)
        ids = tokenizer(doc["text"], add_special_tokens=False).input_ids
        if len(ids) >= need:
            item = {"id": doc["id"], "domain": doc["domain"], "family": doc["family"], "ids": ids[:need]}
            by_domain.setdefault(doc["domain"], []).append(item)
    reported, sweep = [], []
    for domain in sorted(by_domain):
        items = sorted(by_domain[domain], key=lambda d: _order(d["id"]))
        k = config.prompts_per_domain or len(items)
        reported += items[:k]
        sweep += items[k:]
    sweep = sorted(sweep, key=lambda d: _order(d["id"]))[: config.sweep_prompts]
    return reported, sweep


class Evaluator:
    """Runs one method on one prompt and scores the adapter at the checkpoints."""

    def __init__(self, trainer: Trainer, selector: Selector, tokenizer, config: Config) -> None:
        self.trainer, self.selector, self.tokenizer, self.config = trainer, selector, tokenizer, config

    def score(self, prompt: dict, view) -> dict[str, float]:
        """Bits of the continuation and of the whole window under `view` (a context manager giving the model)."""
        p = self.config.prompt_tokens
        context, continuation = prompt["ids"][:p], prompt["ids"][p:]
        cont_bytes = len(self.tokenizer.decode(continuation).encode("utf-8"))
        all_bytes = len(self.tokenizer.decode(prompt["ids"]).encode("utf-8"))
        prefix = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        with view as model:
            cont_bits = continuation_bits(model, context, continuation)
            doc_bits = continuation_bits(model, [prefix], prompt["ids"])
        return {
            "bpb": cont_bits / cont_bytes,
            "bits": cont_bits,
            "bytes": cont_bytes,
            "doc_bpb": doc_bits / all_bytes,
            "doc_bits": doc_bits,
            "doc_bytes": all_bytes,
        }

    def run(self, prompt: dict, method: Method, learning_rate: float, seed: int) -> dict:
        started = time.monotonic()
        base = self.score(prompt, self.trainer.adapted(None))
        if method.rule is None:
            return {"steps": 0, "curve": {"0": base}, "final": base, "sigma2": [], "seconds": 0.0}
        text = self.tokenizer.decode(prompt["ids"][: self.config.prompt_tokens])
        picked = self.selector.select(
            [text],
            self.config.max_steps,
            method=method.rule,
            lambda_=method.lambda_,
            alpha=method.alpha,
            candidates=self.config.candidates,
            seed=seed,
        )[0]
        curve = {"0": base}
        request = TrainRequest(documents=[d.text for d in picked.documents], learning_rate=learning_rate, seed=seed)

        def at_step(done: TrainStep) -> None:
            if done.step in self.config.checkpoints:
                curve[str(done.step)] = self.score(prompt, self.trainer.training(request))

        result = self.trainer.train(request, progress=at_step)
        final = curve.get(str(result.steps))
        if final is None:
            final = self.score(prompt, self.trainer.adapted(result.adapter)) if result.adapter else base
        return {
            "steps": result.steps,
            "curve": curve,
            "final": final,
            "sigma2": picked.sigma2,
            "documents": [d.id for d in picked.documents],
            "repeats": picked.repeats,
            "losses": result.losses,
            "seconds": time.monotonic() - started,
        }


def summarise(results: dict, methods: list[str]) -> dict:
    """bpb per method: per domain micro-averaged over bytes, then overall (domains equal, and by bytes)."""
    per_domain: dict[str, dict[str, float]] = {}
    overall_bytes: dict[str, float] = {}
    steps: dict[str, float] = {}
    prompts = results["prompts"]
    domains = sorted({p["domain"] for p in prompts.values()})
    for m in methods:
        done = [p for p in prompts.values() if m in p["methods"]]
        if not done:
            continue
        for d in domains:
            rows = [p["methods"][m]["final"] for p in done if p["domain"] == d]
            if rows:
                per_domain.setdefault(d, {})[m] = sum(r["bits"] for r in rows) / sum(r["bytes"] for r in rows)
        rows = [p["methods"][m]["final"] for p in done]
        overall_bytes[m] = sum(r["bits"] for r in rows) / sum(r["bytes"] for r in rows)
        steps[m] = statistics.mean(p["methods"][m]["steps"] for p in done)
    overall = {m: statistics.mean(per_domain[d][m] for d in per_domain if m in per_domain[d]) for m in overall_bytes}
    return {"overall": overall, "overall_by_bytes": overall_bytes, "per_domain": per_domain, "steps": steps}


def markdown(summary: dict, methods: list[str]) -> str:
    lines = ["| domain | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for d, row in sorted(summary["per_domain"].items()):
        lines.append(f"| {d} | " + " | ".join(f"{row[m]:.3f}" if m in row else "" for m in methods) + " |")
    lines.append(
        "| **overall** | "
        + " | ".join(f"**{summary['overall'][m]:.3f}**" for m in methods if m in summary["overall"])
        + " |"
    )
    lines.append(
        "| steps | " + " | ".join(f"{summary['steps'][m]:.1f}" for m in methods if m in summary["steps"]) + " |"
    )
    return "\n".join(lines) + "\n"


def plots(results: dict, config: Config, out: Path, name: str) -> dict[str, float | None]:
    """bpb against steps per method; realised gain against SIFT's sigma^2; adaptive SIFT bpb against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, what: str) -> None:
        fig.tight_layout()
        fig.savefig(out / f"quality-{name}-{what}.png", dpi=120)
        plt.close(fig)

    prompts = list(results["prompts"].values())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in results["methods"]:
        xs, ys = [], []
        for step in (0, *config.checkpoints):
            vals = []
            for p in prompts:
                run = p["methods"].get(m)
                if run is None:
                    continue
                point = run["curve"].get(str(step)) or run["final"]  # early stop: carry the final value
                vals.append(point["bits"] / point["bytes"])
            if vals:
                xs.append(step)
                ys.append(statistics.mean(vals))
        ax.plot(xs, ys, marker="o", label=m)
    ax.set_xlabel("training steps")
    ax.set_ylabel("bits per byte (continuation), mean over prompts")
    ax.legend(fontsize=7)
    save(fig, "curves")

    gains, sigmas = [], []
    for p in prompts:
        run, base = p["methods"].get("sift"), p["methods"].get("base")
        if run and base and run["sigma2"]:
            gains.append(base["final"]["bpb"] - run["final"]["bpb"])
            sigmas.append(run["sigma2"][-1])
    corr = None
    if len(gains) >= 3 and statistics.pstdev(gains) > 0 and statistics.pstdev(sigmas) > 0:
        corr = statistics.correlation(sigmas, gains)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(sigmas, gains)
    ax.set_xlabel("SIFT posterior variance after the last pick")
    ax.set_ylabel("realised gain (base bpb - SIFT bpb)")
    ax.set_title(f"Pearson r = {corr:.2f}" if corr is not None else "too few points")
    save(fig, "gain-vs-sigma2")

    fig, ax = plt.subplots(figsize=(5, 4))
    for m in results["methods"]:
        if m.startswith(("adaptive_sift", "sift")) and not m.startswith("sift_lambda"):
            runs = [p["methods"][m] for p in prompts if m in p["methods"]]
            if runs:
                ax.scatter(
                    [statistics.mean(r["steps"] for r in runs)],
                    [statistics.mean(r["final"]["bpb"] for r in runs)],
                    label=m,
                )
    ax.set_xlabel("mean training steps (compute)")
    ax.set_ylabel("bits per byte")
    ax.legend(fontsize=7)
    save(fig, "compute")
    return {"sigma2_gain_correlation": corr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--corpus", type=Path, default=default_cache_dir() / "corpus")
    parser.add_argument("--index", type=Path, required=True, help="index over CORPUS/train.jsonl")
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = CONFIGS[args.config]
    model_dir = resolve_model(args.model, default_cache_dir())
    embedder = load_embedder("minilm", model_dir)
    selector = Selector(CorpusIndex.load(args.index, embedder), embedder)
    path = args.out / f"quality-{args.config}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("config", {**asdict(config), "name": args.config})
    results.setdefault("prompts", {})
    results["methods"] = [m.name for m in config.methods]

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))

    trainer_config = TrainerConfig(
        max_steps=config.max_steps,
        max_train_tokens=config.train_tokens,
        time_budget_s=None,
        rank=config.rank,
        device=args.device,
    )
    trainer = Trainer(model_dir, trainer_config)
    evaluator = Evaluator(trainer, selector, trainer.tokenizer, config)
    reported, sweep = prompts(args.corpus / "heldout.jsonl", trainer.tokenizer, config)
    log.info("%d reported prompts, %d for the learning-rate sweep", len(reported), len(sweep))

    if "learning_rate" not in results:
        sift = next(m for m in config.methods if m.name == "sift")
        scores = {}
        for lr in config.learning_rates:
            runs = [evaluator.run(p, sift, lr, seed=0)["final"] for p in tqdm(sweep, desc=f"lr {lr:g}")]
            scores[str(lr)] = sum(r["bits"] for r in runs) / sum(r["bytes"] for r in runs)
        results["learning_rate_sweep"] = scores
        results["learning_rate"] = float(min(scores, key=scores.get))
        save()
    lr = results["learning_rate"]
    log.info("learning rate %g (sweep: %s)", lr, results["learning_rate_sweep"])

    for prompt in tqdm(reported, desc="prompts"):
        entry = results["prompts"].setdefault(prompt["id"], {"domain": prompt["domain"], "methods": {}})
        for method in config.methods:
            if method.name not in entry["methods"]:
                entry["methods"][method.name] = evaluator.run(prompt, method, lr, seed=0)
                save()

    methods = [m.name for m in config.methods]
    results["summary"] = summarise(results, methods)
    results["summary"].update(plots(results, config, args.out, args.config))
    save()
    table = markdown(results["summary"], methods)
    (args.out / f"quality-{args.config}.md").write_text(table)
    print(table)
    print(f"sigma^2 / gain correlation: {results['summary']['sigma2_gain_correlation']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
