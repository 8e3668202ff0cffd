"""`python -m benchmarks.quality`: run (or resume) the protocol, then summarise, plot and tabulate."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

from benchmarks.quality import __doc__ as description
from benchmarks.quality.config import CONFIGS
from benchmarks.quality.plots import plots
from benchmarks.quality.protocol import run_protocol
from benchmarks.quality.records import Results
from benchmarks.quality.report import markdown
from benchmarks.quality.statistics import summarise
from infra.config import default_cache_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--corpus", type=Path, default=default_cache_dir() / "corpus")
    parser.add_argument(
        "--index",
        type=Path,
        action="append",
        required=True,
        help="an index over CORPUS/train.jsonl; once per chunk size the recipe search tries (128 and 256 tokens)",
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--summarise-only", action="store_true", help="recompute the summary of a saved run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = CONFIGS[args.config]
    path = args.out / f"quality-{args.config}.json"
    results = Results.model_validate_json(path.read_text()) if path.exists() else Results()
    if not results.config:
        results.config = {**asdict(config), "name": args.config}

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results.model_dump(mode="json"), indent=1))

    if not args.summarise_only:
        run_protocol(results, config, args, save)
    summary = summarise(results, config)
    results.summary = summary
    save()
    plots(results, summary, config, args.out, args.config)
    table = markdown(summary)
    (args.out / f"quality-{args.config}.md").write_text(table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
