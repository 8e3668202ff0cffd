"""The bodies of the Selector, Trainer and Generator deployments: thin async wrappers around the plain
engines (`selection.Selector`, `adapters.Trainer`, a `Generator`), usable with or without Ray Serve.

Each is constructed from the one `Settings` object, and each method is what a DeploymentHandle calls.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from adapters.handle import AdapterHandle
from adapters.trainer import Trainer, TrainRequest, TrainResult
from selection.build import default_index_dir
from selection.embed import Embedder, load_embedder
from selection.index import CorpusIndex, check_tokenizer
from selection.models import resolve_model
from selection.selector import Selector
from serving.config import Settings
from serving.generation import Chunk, Sampling, make_generator

log = logging.getLogger(__name__)


def index_dir(settings: Settings) -> Path:
    return settings.index_path or default_index_dir(settings.models)


def model_dir(settings: Settings) -> Path:
    return resolve_model(settings.models.base_model, settings.models.cache_dir)


def open_index(settings: Settings) -> tuple[CorpusIndex, Embedder]:
    """Load the configured index and embedder; refuse (IndexMismatchError) an index chunked with another
    tokenizer than the served model's or embedded with another embedder than the configured one."""
    from transformers import AutoTokenizer

    directory = index_dir(settings)
    manifest = CorpusIndex.read_manifest(directory)
    model = model_dir(settings)
    check_tokenizer(manifest, AutoTokenizer.from_pretrained(model), directory)
    embedder = load_embedder(settings.models.embedder, model, settings.models.device)
    return CorpusIndex.load(directory, embedder), embedder


@dataclass(frozen=True)
class SelectQuery:
    prompt: str
    n: int
    method: str
    lambda_: float
    alpha: float | None
    candidates: int


class SelectorService:
    """Selection for prompts; concurrent calls are batched into one `select_batch` per parameter set."""

    def __init__(self, settings: Settings) -> None:
        index, embedder = open_index(settings)
        self.selector = Selector(index, embedder, settings.models.device)
        self._lock = asyncio.Lock()
        self._pending: list[tuple[SelectQuery, asyncio.Future]] = []

    async def select(self, query: SelectQuery) -> dict:
        """Documents (with texts) and the variance trace for one prompt; see `Selector.select`."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((query, future))
        async with self._lock:  # whoever holds the lock serves everything queued meanwhile, as one batch
            if self._pending:
                batch, self._pending = self._pending, []
                await asyncio.to_thread(self._select_batch, batch)
        return await future

    def _select_batch(self, batch: list[tuple[SelectQuery, asyncio.Future]]) -> None:
        groups: dict[tuple, list[tuple[SelectQuery, asyncio.Future]]] = {}
        for query, future in batch:
            key = (query.n, query.method, query.lambda_, query.alpha, query.candidates)
            groups.setdefault(key, []).append((query, future))
        for (n, method, lambda_, alpha, candidates), items in groups.items():
            try:
                results = self.selector.select(
                    [q.prompt for q, _ in items],
                    n,
                    method=method,
                    lambda_=lambda_,
                    alpha=alpha,
                    candidates=candidates,
                )
                outcomes: list = [r.to_dict(with_text=True) for r in results]
            except Exception as exc:  # each waiting request gets the error
                outcomes = [exc] * len(items)
            for (_, future), outcome in zip(items, outcomes, strict=True):
                loop = future.get_loop()
                if isinstance(outcome, Exception):
                    loop.call_soon_threadsafe(_settle, future, None, outcome)
                else:
                    loop.call_soon_threadsafe(_settle, future, outcome, None)


def _settle(future: asyncio.Future, value: object, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class TrainerService:
    """Test-time training as a stream: {"step", "loss"} after each step, then {"result": TrainResult}.

    Closing the stream early (a client disconnect cancels it) stops training within one step, and an
    adapter that was made but not handed over is deleted.
    """

    def __init__(self, settings: Settings) -> None:
        self.trainer = Trainer(model_dir(settings), settings.trainer)

    async def train(self, request: TrainRequest) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        holder: dict[str, object] = {}

        def work() -> None:
            try:
                holder["result"] = self.trainer.train(
                    request,
                    cancel,
                    lambda step, loss: loop.call_soon_threadsafe(queue.put_nowait, {"step": step, "loss": loss}),
                )
            except BaseException as exc:
                holder["error"] = exc
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        thread = threading.Thread(target=work, name="ttft-train", daemon=True)
        thread.start()
        delivered = False
        try:
            while (event := await queue.get()) is not None:
                yield event
            if "error" in holder:
                raise holder["error"]  # type: ignore[misc]
            result: TrainResult = holder["result"]  # type: ignore[assignment]
            yield {"result": result}
            delivered = True
        finally:
            cancel.set()
            await asyncio.to_thread(thread.join)
            result = holder.get("result")
            if not delivered and isinstance(result, TrainResult) and result.adapter is not None:
                result.adapter.release()

    def waiting(self) -> int:
        return self.trainer.waiting


class GeneratorService:
    """The answering engine (vLLM, or transformers as the fallback)."""

    def __init__(self, settings: Settings) -> None:
        self.generator = make_generator(
            model_dir(settings), settings.generator, settings.trainer.rank, settings.trainer.device
        )

    async def generate(
        self, request_id: str, prompt_ids: list[int], sampling: Sampling, adapter: AdapterHandle | None
    ) -> AsyncIterator[Chunk]:
        async for chunk in self.generator.generate(request_id, prompt_ids, sampling, adapter):
            yield chunk

    def live_adapters(self) -> int:
        return self.generator.live_adapters()

    def max_model_len(self) -> int:
        return self.generator.max_model_len

    def __del__(self) -> None:
        if hasattr(self, "generator"):  # construction may have failed
            self.generator.shutdown()


def sigma_trace(sigma2: list[float]) -> list[float]:
    """sigma_n after each pick (n >= 1) from the variance trace (prior first)."""
    return [math.sqrt(max(0.0, v)) for v in sigma2[1:]]
