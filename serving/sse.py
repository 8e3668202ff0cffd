"""Server-sent events: a model as one `data:` event, and a heartbeat for streams that would go silent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pydantic import BaseModel


def sse_data(model: BaseModel) -> str:
    """One SSE event carrying `model` as JSON (unset optional fields left out, as OpenAI's chunks do)."""
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


async def with_heartbeat(events: AsyncIterator, interval: float) -> AsyncIterator:
    """The events, with None whenever `interval` seconds pass without one (time for an SSE comment)."""
    iterator = events.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            finished, pending = pending, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await iterator.aclose()  # type: ignore[attr-defined]
