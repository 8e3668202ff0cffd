"""Conversations that learn once: multi-turn conversations with sessions against retraining every turn.

Each conversation is one held-out new-knowledge document of the quality benchmark (one per source, at
least `turns` x 256 tokens), cut into consecutive turns: turn t's prompt is its t-th 128-token segment and
the 128 tokens after it are scored (bits per byte). Per turn, two conditions on the same model, index and
recipe as the quality run:

- `fresh`: SIFT picks for the turn's prompt (the served gain budget, at most `max_steps`), a new adapter
  trained on them;
- `session`: the first turn is the same; from the second on, SIFT conditions on every document trained in
  earlier turns and the session's adapter (and AdamW state) continues on the new picks only.

Training has no time budget here (each condition trains the steps it is granted), and no adapter cache.
Reported: training seconds of turns 2-4 (target: sessions <= 50% of retraining), bits per byte per turn
and the paired difference session - fresh (clustered by source; target: no worse).

    python -m benchmarks.sessions --corpus ~/.cache/sift-serve/quality-corpus \\
        --index ~/.cache/sift-serve/quality-corpus/index-256
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import time
from contextlib import aclosing
from pathlib import Path

import numpy as np
from tqdm import tqdm

from adapters.spec import TrainRequest, TrainResult
from benchmarks.corpus.recipes import Group
from benchmarks.quality.config import CONFIGS, Recipe
from benchmarks.quality.evaluation import Evaluator
from benchmarks.quality.prompts import Prompt, groups, load_prompts
from benchmarks.stats import clustered
from infra.config import default_cache_dir
from infra.models import resolve_model
from selection.embed import load_embedder
from selection.index import CorpusIndex
from selection.selector import Selector
from serving.config import AdaptationConfig, Settings
from serving.contracts import resolve
from serving.services import TrainerService

log = logging.getLogger(__name__)

CONDITIONS = ("fresh", "session")
SEGMENT = 128
"""Tokens of one turn's prompt, and of its scored continuation."""


def conversations(corpus: Path, tokenizer, turns: int) -> list[Prompt]:
    """One long held-out new-knowledge document per source (its first `turns` x 256 tokens)."""
    group = groups(corpus)
    docs = load_prompts(corpus / "heldout.jsonl", tokenizer, turns * 2 * SEGMENT, 1)
    return [d for d in docs if group[d.domain] is Group.NEW]


def turn_prompt(doc: Prompt, t: int) -> Prompt:
    """Turn t (0-based): its prompt segment and the continuation that is scored."""
    start = t * 2 * SEGMENT
    return dataclasses.replace(doc, id=f"{doc.id}@{t}", ids=doc.ids[start : start + 2 * SEGMENT])


def run(args: argparse.Namespace) -> dict:
    config = dataclasses.replace(CONFIGS["cpu"], prompt_tokens=SEGMENT, eval_tokens=SEGMENT)
    model = resolve_model("default", default_cache_dir())
    evaluator = Evaluator(model, config)
    recipe = Recipe.of(json.loads(args.quality.read_text())["recipe"]["chosen"])
    embedder = load_embedder("minilm", None)
    selector = Selector(CorpusIndex.load(args.index, embedder), embedder)
    settings = Settings(
        adaptation=AdaptationConfig(max_steps=args.max_steps, max_train_tokens=recipe.train_tokens, time_budget_s=None),
        trainer={"rank": recipe.rank, "layers": recipe.layers, "cache_bytes": 0, "max_batch": 1},
        server={"limits": {"max_steps": args.max_steps}},
    )
    resolved = resolve(None, settings)
    service = TrainerService(settings)  # the serving path: the same service, sessions and all
    rows = []
    for doc in tqdm(conversations(args.corpus, evaluator.tokenizer, args.turns)[: args.conversations], unit="chat"):
        key, row = f"benchmark/{doc.id}", {"id": doc.id, "source": doc.domain, "turns": []}
        for t in range(args.turns):
            prompt = turn_prompt(doc, t)
            text = evaluator.tokenizer.decode(prompt.ids[:SEGMENT])
            entry = {}
            for condition in CONDITIONS:
                given = asyncio.run(service.session(key)).documents if condition == "session" else ()
                picked = selector.select([text], resolved.selection, [given])[0]
                request = TrainRequest(
                    tuple(d.text for d in picked.documents),
                    resolved.training,
                    picked.stop_reason,
                    session=key if condition == "session" else None,
                    picked=tuple(d.given() for d in picked.documents),
                )
                started = time.monotonic()
                result = asyncio.run(train(service, request))
                seconds = time.monotonic() - started
                score = (
                    evaluator.adapter(prompt, result.adapter, recipe)
                    if result.adapter is not None
                    else evaluator.base(prompt).final
                )
                entry[condition] = {"steps": result.steps, "seconds": seconds, "bpb": score.bpb, "given": len(given)}
            row["turns"].append(entry)
        rows.append(row)
    return {"conversations": rows}


async def train(service: TrainerService, request: TrainRequest) -> TrainResult:
    """The service's result for `request` (its progress steps are not needed here)."""
    async with aclosing(service.train(request)) as items:
        async for item in items:
            if isinstance(item, TrainResult):
                return item
    raise RuntimeError("the trainer ended without a result")


def summarise(results: dict) -> dict:
    rows = results["conversations"]
    sources = [r["source"] for r in rows]
    later = range(1, len(rows[0]["turns"]))
    seconds = {
        c: np.array([sum(r["turns"][t][c]["seconds"] for t in later) for r in rows]) for c in ("fresh", "session")
    }
    steps = {c: np.array([sum(r["turns"][t][c]["steps"] for t in later) for r in rows]) for c in ("fresh", "session")}
    out: dict = {
        "conversations": len(rows),
        "sources": len(set(sources)),
        "later_turn_train_seconds": {c: float(v.sum()) for c, v in seconds.items()},
        "later_turn_steps": {c: float(v.mean()) for c, v in steps.items()},
        "session_share_of_training_time": float(seconds["session"].sum() / seconds["fresh"].sum()),
        "per_turn": [],
    }
    for t in range(len(rows[0]["turns"])):
        fresh = np.array([r["turns"][t]["fresh"]["bpb"] for r in rows])
        session = np.array([r["turns"][t]["session"]["bpb"] for r in rows])
        entry = {"turn": t + 1, "fresh": float(fresh.mean()), "session": float(session.mean())}
        if t > 0:
            entry["session_minus_fresh"] = dataclasses.asdict(clustered(session - fresh, sources))
        out["per_turn"].append(entry)
    diff = np.concatenate(
        [[r["turns"][t]["session"]["bpb"] - r["turns"][t]["fresh"]["bpb"] for t in later] for r in rows]
    )
    out["later_turns_session_minus_fresh"] = dataclasses.asdict(clustered(diff, [s for s in sources for _ in later]))
    out["targets"] = {
        "training_time_at_most_half": out["session_share_of_training_time"] <= 0.5,
        "quality_no_worse": out["later_turns_session_minus_fresh"]["mean"] <= 0,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--quality", type=Path, default=Path("benchmarks/results/quality-cpu.json"))
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=16)
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sessions-cpu.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = run(args)
    results["settings"] = {k: str(v) for k, v in vars(args).items()}
    results["summary"] = summarise(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
