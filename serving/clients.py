"""The services' typed calling convention, whether they are objects in this process or Ray Serve deployments.

`SelectorAPI`, `TrainerAPI` and `GeneratorAPI` are what the pipeline and the OpenAI server are written
against: the service objects of `serving.services` satisfy them in one process (tests, `local_server`), and
`SelectorHandle`, `TrainerHandle` and `GeneratorHandle` satisfy them over Ray Serve DeploymentHandles. Every
argument and result is a typed object from `serving.contracts` or `adapters.spec`.

`check` refuses at once (503, `Unavailable`) when the service cannot answer, and a call its deployment's
full queue refuses is a 429 (`Overloaded`) in OpenAI's shape. Streams are async generators: closing one
(`contextlib.aclosing`) closes or cancels what it iterates at once, so a client that goes away stops the
work behind it without waiting for garbage collection.

`ShardClient` is the blocking counterpart the Selector uses to search the index shards it does not hold.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol

import numpy as np

from adapters.experts import Merged
from adapters.spec import TrainRequest, TrainResult, TrainStep
from selection.index import Candidates
from selection.selector import SelectionResult
from selection.store import StoredChunk
from serving.availability import Overloaded, ServeAvailability, Unavailable
from serving.contracts import Chunk, GenerateRequest, MergeQuery, Readiness, SelectQuery, SessionTurn


class Service(Protocol):
    def check(self) -> None:
        """Raise `Unavailable` when the service has no running replica to answer."""
        ...

    async def ready(self) -> Readiness: ...


class SelectorAPI(Service, Protocol):
    async def select(self, query: SelectQuery) -> SelectionResult: ...

    async def merge(self, query: MergeQuery) -> Merged:
        """The index's experts merged for the prompt (the Selector holds the embedder and the experts)."""
        ...


class TrainerAPI(Service, Protocol):
    def train(self, request: TrainRequest) -> AsyncGenerator[TrainStep | TrainResult]:
        """A `TrainStep` after each step, then the `TrainResult`; closing the stream cancels the training."""
        ...

    async def session(self, key: str) -> SessionTurn:
        """Where conversation `key` stands as a turn starts."""
        ...

    async def drop_session(self, key: str) -> bool:
        """Delete conversation `key`; whether it existed."""
        ...


class GeneratorAPI(Service, Protocol):
    def generate(self, request: GenerateRequest) -> AsyncGenerator[Chunk]: ...


class HandleClient:
    """A Ray Serve deployment behind its DeploymentHandle.

    `part` names the service in errors; `needs` are the deployments that must have a running replica for a
    call to be answered (the deployment itself, and for the Selector its index shards). A call that finds
    one of them down, or whose replica dies under it, raises `Unavailable` instead of waiting.
    """

    def __init__(
        self,
        handle: Any,
        part: str,
        needs: Sequence[str],
        availability: ServeAvailability,
        retry_after_s: float,
    ) -> None:
        self.handle, self.part, self.needs = handle, part, list(needs)
        self.availability, self.retry_after_s = availability, retry_after_s

    def check(self) -> None:
        if not all(self.availability.running(name) for name in self.needs):
            raise Unavailable(self.part, self.retry_after_s)

    async def ready(self) -> Readiness:
        self.check()
        return await self._result(self.handle.ready.remote())

    @property
    def streaming(self) -> Any:
        """The handle for methods that yield."""
        return self.handle.options(stream=True)

    async def _result(self, response: Any) -> Any:
        watch = asyncio.ensure_future(self.availability.until_down(self.needs))
        try:
            return await self._unless_down(asyncio.ensure_future(response), watch)
        finally:
            watch.cancel()
            _cancel(response)

    async def _items(self, response: Any) -> AsyncGenerator[Any]:
        watch = asyncio.ensure_future(self.availability.until_down(self.needs))
        try:
            while True:
                try:
                    item = await self._unless_down(asyncio.ensure_future(anext(response)), watch)
                except StopAsyncIteration:
                    return
                yield item
        finally:
            watch.cancel()
            _cancel(response)  # the replica's generator is closed too

    async def _unless_down(self, work: asyncio.Future, watch: asyncio.Future) -> Any:
        """`work`'s result, or `Unavailable` once a needed deployment has lost its last replica (or the
        replica answering dies)."""
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this request was cancelled (its client went away): so is the call
            work.cancel()
            raise
        if not work.done():
            work.cancel()
            raise Unavailable(self.part, self.retry_after_s)
        try:
            return work.result()
        except _QUEUE_FULL as exc:
            raise Overloaded(self.part, self.retry_after_s) from exc
        except _REPLICA_GONE as exc:
            raise Unavailable(self.part, self.retry_after_s) from exc


class SelectorHandle(HandleClient):
    async def select(self, query: SelectQuery) -> SelectionResult:
        self.check()
        return await self._result(self.handle.select.remote(query))

    async def merge(self, query: MergeQuery) -> Merged:
        self.check()
        return await self._result(self.handle.merge.remote(query))


class TrainerHandle(HandleClient):
    """Calls about a conversation carry its key as the call's multiplexed model id, the key by which
    `serving.session_router` sends all of them to the one replica that holds its state."""

    def train(self, request: TrainRequest) -> AsyncGenerator[TrainStep | TrainResult]:
        self.check()
        handle = self.streaming
        if request.session is not None:
            handle = handle.options(multiplexed_model_id=request.session)
        return self._items(handle.train.remote(request))

    async def session(self, key: str) -> SessionTurn:
        self.check()
        return await self._result(self.handle.options(multiplexed_model_id=key).session.remote(key))

    async def drop_session(self, key: str) -> bool:
        self.check()
        return await self._result(self.handle.options(multiplexed_model_id=key).drop_session.remote(key))


class GeneratorHandle(HandleClient):
    def generate(self, request: GenerateRequest) -> AsyncGenerator[Chunk]:
        self.check()
        return self._items(self.streaming.generate.remote(request))


class ShardClient:
    """An index shard held by another deployment, as a `selection.shards.Shard` (blocking calls: the Selector
    searches from its worker threads). A shard that does not answer within `timeout_s` fails the search."""

    def __init__(self, handle: Any, timeout_s: float) -> None:
        self.handle, self.timeout_s = handle, timeout_s

    def search(self, queries: np.ndarray, k: int) -> Candidates:
        return self.handle.search.remote(queries, k).result(timeout_s=self.timeout_s)

    def chunks(self, rows: Sequence[int]) -> list[StoredChunk]:
        return self.handle.chunks.remote([int(r) for r in rows]).result(timeout_s=self.timeout_s)


def _ray_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    return (BackPressureError,), (RayActorError,)


_QUEUE_FULL, _REPLICA_GONE = _ray_errors()


def _cancel(response: Any) -> None:
    """Cancel a handle call (a no-op once it has finished). Ray re-raises a call's own failure (a full queue,
    a dead replica) from `cancel`; that failure is already reported, and must not replace the error the
    client gets (an OpenAI-shaped 429 or 503) with Ray's."""
    with contextlib.suppress(*_QUEUE_FULL, *_REPLICA_GONE):
        response.cancel()
