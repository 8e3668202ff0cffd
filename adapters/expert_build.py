"""`build_experts`: cluster an index into neighbourhoods and train one LoRA expert per cluster, once, ahead of
any request (what `sift-serve experts build` runs).

Clusters are balanced bisecting k-means over the index's embeddings (`selection.clusters`); an expert's key
is its cluster's normalised mean embedding. Each expert is one request to the same `Trainer` that serves
prompts (so experts train batched, `max_batch` at a time): `steps` steps, one document per step, the
cluster's documents in a seeded shuffle (repeated when the cluster has fewer than `steps`), expert k's
adapter initialised from seed + k. An expert is written the moment it finishes (to a temporary directory,
then renamed), so an interrupted build resumes where it stopped; a build over experts of another index,
model or plan is refused unless `overwrite`.
"""

from __future__ import annotations

import logging
import shutil
import threading
from concurrent.futures import as_completed
from pathlib import Path

import numpy as np
from tqdm import tqdm

from adapters.config import TrainerConfig
from adapters.experts import (
    KEYS_FILE,
    LABELS_FILE,
    MANIFEST_FILE,
    ExpertManifest,
    ExpertPlan,
    ExpertsMismatchError,
    IndexRef,
    ModelRef,
    expert_dir,
    experts_dir,
    finished,
)
from adapters.handle import CONFIG_FILE, WEIGHTS_FILE
from adapters.spec import TrainRequest, TrainSpec, TrainStep
from adapters.trainer import Trainer
from selection.clusters import balanced_clusters, cluster_keys
from selection.index import CorpusIndex
from selection.manifest import IndexManifest

log = logging.getLogger(__name__)


def plan_for(
    config: TrainerConfig, experts: int, steps: int, learning_rate: float, max_train_tokens: int
) -> ExpertPlan:
    """The plan of a build with this trainer configuration."""
    return ExpertPlan(
        experts=experts,
        steps=steps,
        learning_rate=learning_rate,
        max_train_tokens=max_train_tokens,
        seed=config.seed,
        rank=config.rank,
        lora_alpha=config.lora_alpha,
        layers=str(config.layers),
    )


def build_experts(
    index_dir: Path,
    model_dir: Path,
    config: TrainerConfig,
    plan: ExpertPlan,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Build (or finish building) the experts of the index in `index_dir`; returns their directory."""
    index_manifest = IndexManifest.read(index_dir)
    if index_manifest.shards:
        raise ExpertsMismatchError(
            f"{index_dir} is a sharded index: build the experts on the unsharded index, then split it"
        )
    directory = experts_dir(index_dir)
    manifest = _prepare(directory, index_manifest, model_dir, plan, overwrite)
    done = set(finished(directory, manifest))
    todo = [k for k in range(plan.experts) if k not in done]
    if not todo:
        log.info("all %d experts of %s are built", plan.experts, index_dir)
        return directory
    index = CorpusIndex.load(index_dir, gpu=False)
    try:
        labels = np.load(directory / LABELS_FILE)
        documents = {k: _documents(index, np.flatnonzero(labels == k), plan, k) for k in todo}
    finally:
        index.close()
    _train(directory, model_dir, config, plan, documents, progress)
    return directory


def _prepare(
    directory: Path, index: IndexManifest, model_dir: Path, plan: ExpertPlan, overwrite: bool
) -> ExpertManifest:
    """The manifest of this build: the one on disk when it matches (resume), else a fresh clustering."""
    if (directory / MANIFEST_FILE).is_file():
        try:
            existing = ExpertManifest.read(directory)
            existing.check(index, model_dir, directory)
            if existing.plan != plan:
                raise ExpertsMismatchError(
                    f"{directory} holds experts built with {existing.plan.model_dump()}, not "
                    f"{plan.model_dump()}; pass --overwrite to rebuild them"
                )
            return existing
        except ExpertsMismatchError:
            if not overwrite:
                raise
        shutil.rmtree(directory)
    elif directory.exists():
        if not overwrite:
            raise ExpertsMismatchError(f"{directory} exists but holds no experts manifest; pass --overwrite")
        shutil.rmtree(directory)
    embeddings = np.load(Path(directory).parent / "embeddings.npy", mmap_mode="r")
    if plan.experts > len(embeddings):
        raise ValueError(f"{plan.experts} experts need at least as many index rows; the index has {len(embeddings)}")
    log.info("clustering %d rows into %d balanced clusters", len(embeddings), plan.experts)
    labels = balanced_clusters(embeddings, plan.experts, plan.seed)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    np.save(staging / KEYS_FILE, cluster_keys(embeddings, labels, plan.experts))
    np.save(staging / LABELS_FILE, labels)
    sizes = tuple(int(s) for s in np.bincount(labels, minlength=plan.experts))
    manifest = ExpertManifest(index=IndexRef.of(index), model=ModelRef.of(model_dir), plan=plan, sizes=sizes)
    manifest.write(staging)
    staging.rename(directory)
    return manifest


def _documents(index: CorpusIndex, rows: np.ndarray, plan: ExpertPlan, k: int) -> tuple[str, ...]:
    """Expert k's training documents: its cluster's rows in a seeded shuffle, repeated up to `plan.steps`."""
    order = np.random.default_rng([plan.seed, k]).permutation(rows)
    picks = np.resize(order, plan.steps)
    return tuple(chunk.text for chunk in index.chunks(picks.tolist()))


def _train(
    directory: Path,
    model_dir: Path,
    config: TrainerConfig,
    plan: ExpertPlan,
    documents: dict[int, tuple[str, ...]],
    progress: bool,
) -> None:
    """Train the experts in `documents` (all submitted at once: the trainer batches them) and write each as it
    finishes. A failed expert fails the build after the others are written (a rerun retries it)."""
    trainer = Trainer(model_dir, config.model_copy(update={"max_waiting": max(len(documents), 1)}))
    bar = tqdm(total=len(documents) * plan.steps, desc="training experts", unit="step", disable=not progress)
    lock = threading.Lock()

    def advance(_: TrainStep) -> None:
        with lock:
            bar.update(1)

    def request(k: int, docs: tuple[str, ...]) -> TrainRequest:
        spec = TrainSpec(plan.steps, plan.learning_rate, plan.max_train_tokens, time_budget_s=None, seed=plan.seed + k)
        return TrainRequest(documents=docs, spec=spec, request_id=f"expert {k}")

    tickets = {k: trainer.submit(request(k, docs), advance) for k, docs in documents.items()}
    expert_of = {ticket.future: k for k, ticket in tickets.items()}
    failed = []
    try:
        for future in as_completed(expert_of):
            k = expert_of[future]
            try:
                result = future.result()
            except Exception as exc:
                log.error("expert %d failed: %s", k, exc)
                failed.append(k)
                continue
            if result.adapter is None:
                log.error("expert %d produced no adapter (%s)", k, result.stop_reason)
                failed.append(k)
                continue
            staging = expert_dir(directory, k).with_name(f"{k}.partial")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            (staging / WEIGHTS_FILE).write_bytes(result.adapter.weights)
            (staging / CONFIG_FILE).write_text(result.adapter.config_json)
            staging.rename(expert_dir(directory, k))
    finally:
        for ticket in tickets.values():
            ticket.cancel()
        bar.close()
    if failed:
        raise RuntimeError(f"experts {failed} failed to train; run the build again to retry them")
