"""The bodies of the Selector, Trainer, Generator and index-shard deployments: thin async wrappers around
the plain engines (`selection.Selector`, `adapters.Trainer`, a `Generator`, `selection.shards.LocalShard`),
usable with or without Ray Serve.

Each is constructed from the one `Settings` object; each method is what a DeploymentHandle calls, and
everything crossing it is a typed object (`SelectQuery` -> `SelectionResult`, `TrainRequest` ->
`TrainStep`s then a `TrainResult`, `GenerateRequest` -> `Chunk`s). In one process the services are their
own clients: each satisfies its protocol in `serving.clients` (`check` is a no-op: an object in this
process is always there).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import numpy as np

from adapters.cache import AdapterCache, cacheable
from adapters.cache import key as cache_key
from adapters.experts import ExpertSet, ExpertsMismatchError, Merged, NoExpertsError, unavailable
from adapters.sessions import Session, SessionStore
from adapters.spec import TrainRequest, TrainResult, TrainStep
from adapters.trainer import Trainer
from infra.models import resolve_model
from selection.build import default_index_dir
from selection.embed import Embedder, load_embedder
from selection.index import Candidates, CorpusIndex, check_embedder, check_tokenizer
from selection.manifest import IndexManifest
from selection.selector import SelectionResult, SelectOptions, Selector
from selection.shards import LocalShard, Shard, ShardedIndex, load_index, shard_dir
from selection.store import StoredChunk
from serving.config import Settings
from serving.contracts import Chunk, GenerateRequest, MergeQuery, Readiness, SelectQuery, SessionTurn
from serving.engines import make_generator

log = logging.getLogger(__name__)


def index_dir(settings: Settings) -> Path:
    return settings.index_path or default_index_dir(settings.models)


def experts_unavailable(settings: Settings) -> str | None:
    """Why the served index's experts cannot be merged (None: they can)."""
    return unavailable(index_dir(settings), model_dir(settings))


def load_experts(settings: Settings) -> ExpertSet | None:
    """The served index's experts, or None (with the reason logged) when it has none that fit."""
    try:
        return ExpertSet.load(index_dir(settings), model_dir(settings))
    except (NoExpertsError, ExpertsMismatchError) as exc:
        log.info("merging is off: %s", exc)
        return None


def model_dir(settings: Settings) -> Path:
    return resolve_model(settings.models.base_model, settings.models.cache_dir)


def open_index(settings: Settings, shards: list[Shard] | None = None) -> tuple[CorpusIndex | ShardedIndex, Embedder]:
    """Load the configured index and embedder; refuse (IndexMismatchError) an index chunked with another
    tokenizer than the served model's or embedded with another embedder than the configured one.

    A sharded index is searched through `shards` when given (the shard deployments), else all its shards
    are loaded here."""
    from transformers import AutoTokenizer

    directory = index_dir(settings)
    manifest = IndexManifest.read(directory)
    model = model_dir(settings)
    check_tokenizer(manifest, AutoTokenizer.from_pretrained(model), directory)
    embedder = load_embedder(settings.models.embedder, model, settings.models.device)
    if shards is None:
        return load_index(directory, embedder), embedder
    if len(shards) != manifest.shards:
        raise ValueError(f"{directory} has {manifest.shards} shards, but {len(shards)} shard services were given")
    check_embedder(manifest, embedder, directory)
    return ShardedIndex(manifest, shards, settings.server.shard_timeout_s), embedder


class InProcess:
    """A service object used directly, as its own client."""

    def check(self) -> None:
        """An object in this process is always there."""


class SelectorService(InProcess):
    """Selection for prompts; concurrent calls are batched into one `Selector.select` per parameter set.

    A batch that fails is retried prompt by prompt, so one bad prompt fails only its own request; a batch
    that an index shard did not answer in time fails as a whole, after one timeout (`ShardTimeoutError`).
    """

    def __init__(self, settings: Settings, shards: list[Shard] | None = None) -> None:
        index, embedder = open_index(settings, shards)
        self.selector = Selector(index, embedder, settings.models.device)
        self.experts = load_experts(settings)
        self._lock = asyncio.Lock()
        self._pending: list[tuple[SelectQuery, asyncio.Future]] = []

    async def ready(self) -> Readiness:
        experts = f", {len(self.experts)} experts" if self.experts is not None else ""
        return Readiness(True, f"ready ({len(self.selector.index)} documents{experts})")

    async def merge(self, query: MergeQuery) -> Merged:
        """The index's experts merged for one prompt (`adapters.experts.ExpertSet.merge`)."""
        if self.experts is None:
            raise NoExpertsError("this index has no usable experts")
        return await asyncio.to_thread(self._merge, self.experts, query)

    def _merge(self, experts: ExpertSet, query: MergeQuery) -> Merged:
        return experts.merge(self.selector.embedder.embed([query.prompt])[0], query.options)

    async def select(self, query: SelectQuery) -> SelectionResult:
        """The picks (with texts) and the variance trace for one prompt; see `Selector.select`."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((query, future))
        async with self._lock:  # whoever holds the lock serves everything queued meanwhile, as one batch
            if self._pending:
                batch, self._pending = self._pending, []
                await asyncio.to_thread(self._select_batch, batch)
        return await future

    def _run(self, queries: list[SelectQuery]) -> list[SelectionResult]:
        return self.selector.select([q.prompt for q in queries], queries[0].options, [q.given for q in queries])

    def _select_batch(self, batch: list[tuple[SelectQuery, asyncio.Future]]) -> None:
        groups: dict[SelectOptions, list[tuple[SelectQuery, asyncio.Future]]] = {}
        for query, future in batch:
            groups.setdefault(query.options, []).append((query, future))
        for items in groups.values():
            try:
                outcomes: list[SelectionResult | Exception] = list(self._run([q for q, _ in items]))
            except TimeoutError as exc:  # a shard did not answer: no prompt's fault, and each would wait again
                outcomes = [exc] * len(items)
            except Exception:
                outcomes = []
                for query, _ in items:  # find the culprit: each prompt alone
                    try:
                        outcomes.append(self._run([query])[0])
                    except Exception as exc:
                        outcomes.append(exc)
            for (_, future), outcome in zip(items, outcomes, strict=True):
                future.get_loop().call_soon_threadsafe(_settle, future, outcome)


class ShardService:
    """Shard `i` of a sharded index: the top-K of its rows for query vectors, and their texts (global rows).

    The Selector embeds prompts, asks every shard, merges the answers and runs SIFT once."""

    def __init__(self, settings: Settings, i: int) -> None:
        self.shard = LocalShard(shard_dir(index_dir(settings), i))

    async def ready(self) -> Readiness:
        return Readiness(True, f"ready (shard {self.shard.i} of {self.shard.of}: {len(self.shard)} documents)")

    async def search(self, queries: np.ndarray, k: int) -> Candidates:
        return await asyncio.to_thread(self.shard.search, queries, k)

    async def chunks(self, rows: list[int]) -> list[StoredChunk]:
        return await asyncio.to_thread(self.shard.chunks, rows)


def _settle(future: asyncio.Future, outcome: object) -> None:
    if future.done():
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class TrainerService(InProcess):
    """Test-time training as a stream: a `TrainStep` after each step, then the `TrainResult` (the adapter
    as bytes). No thread waits per request: the trainer's loop thread hands steps and the result over."""

    def __init__(self, settings: Settings) -> None:
        self.trainer = Trainer(model_dir(settings), settings.trainer)
        self.cache = AdapterCache(settings.trainer.cache_bytes)
        self._model = str(model_dir(settings))
        limits = settings.server.sessions
        self.sessions = SessionStore(limits.ttl_s, limits.max_bytes, limits.max_turns)

    async def ready(self) -> Readiness:
        return Readiness(True, "ready")

    async def session(self, key: str) -> SessionTurn:
        """Where the conversation `key` stands as a turn starts (nothing is reserved: `train` reopens it)."""
        opened = self.sessions.open(key)
        if opened.session is None:
            return SessionTurn(1, (), 0, str(opened.fresh))
        session = opened.session
        return SessionTurn(session.turns + 1, session.documents, session.state.steps, None)

    async def drop_session(self, key: str) -> bool:
        """Delete the conversation `key` now; whether it existed."""
        return self.sessions.drop(key)

    async def train(self, request: TrainRequest) -> AsyncGenerator[TrainStep | TrainResult]:
        """Closing the stream early (a client disconnect) cancels the training within one step. Identical
        training (`adapters.cache`) is answered from the cache, without steps; a conversation's turn
        (`request.session`) continues its session's adapter and optimizer and keeps the result."""
        if request.session is not None:
            async with aclosing(self._turn(request, request.session)) as items:
                async for item in items:
                    yield item
            return
        name = cache_key(request, self.trainer.config, self._model)
        cached = self.cache.get(request, name)
        if cached is not None:
            yield cached
            return
        async with aclosing(self._train(request)) as items:
            async for item in items:
                if isinstance(item, TrainResult) and cacheable(request, item):
                    self.cache.put(name, item)
                yield item

    async def _turn(self, request: TrainRequest, key: str) -> AsyncGenerator[TrainStep | TrainResult]:
        """One turn: resume the session (if it is there), train the new picks, keep the new state (unless the
        turn was cancelled or diverged: the session then stays as it was)."""
        session = self.sessions.open(key).session
        resume = session.state if session is not None else None
        request = dataclasses.replace(request, resume=resume, keep_state=True)
        result: TrainResult | None = None
        if resume is not None and not request.documents:  # nothing new to learn: the session's adapter answers
            result = TrainResult(self.trainer.step.blob(resume.weights), 0, request.documents_end, state=resume)
        else:
            async with aclosing(self._train(request)) as items:
                async for item in items:
                    if isinstance(item, TrainResult):
                        result = item
                    else:
                        yield item
        if result is None:
            return
        if result.state is not None:
            documents = (session.documents if session is not None else ()) + request.picked[: result.steps]
            turns = session.turns + 1 if session is not None else 1
            self.sessions.save(key, Session(result.state, documents, turns))
        yield result

    async def _train(self, request: TrainRequest) -> AsyncGenerator[TrainStep | TrainResult]:
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[TrainStep] = asyncio.Queue()

        def progress(step: TrainStep) -> None:  # on the trainer's loop thread
            loop.call_soon_threadsafe(steps.put_nowait, step)

        ticket = self.trainer.submit(request, progress)
        result = asyncio.wrap_future(ticket.future)
        try:
            while not result.done():
                step = asyncio.ensure_future(steps.get())
                either: list[asyncio.Future[Any]] = [step, result]
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if step.done():
                    yield step.result()
                else:
                    step.cancel()
            while not steps.empty():
                yield steps.get_nowait()
            yield result.result()
        finally:
            ticket.cancel()


class GeneratorService(InProcess):
    """The answering engine (vLLM, or transformers as the fallback); `ray_metrics` under Ray Serve."""

    def __init__(self, settings: Settings, ray_metrics: bool = False) -> None:
        self.generator = make_generator(model_dir(settings), settings.generator, settings.max_adapter_rank, ray_metrics)

    async def ready(self) -> Readiness:
        await self.generator.check_health()
        return Readiness(True, "ready")

    async def check_health(self) -> None:
        """Ray Serve's health probe: raising marks the replica unhealthy, and Serve replaces it."""
        await self.generator.check_health()

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[Chunk]:
        async with aclosing(self.generator.generate(request)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def loaded_adapters(self) -> int:
        """Adapters the engine holds right now, by the engine's own account (0 between requests)."""
        return await self.generator.loaded_adapters()

    def max_model_len(self) -> int:
        return self.generator.max_model_len

    def __del__(self) -> None:
        if hasattr(self, "generator"):  # construction may have failed
            self.generator.shutdown()
