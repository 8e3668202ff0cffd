"""One calling convention for the services, whether they are local objects or Ray Serve deployments.

`call` awaits a method's result; `stream` iterates a method that yields. The OpenAI server is written
against this, so it runs unchanged in tests (local objects) and in Ray Serve (DeploymentHandles).
Streams are async generators: closing one (`contextlib.aclosing`) closes or cancels what it iterates at
once, so a client that goes away stops the work behind it without waiting for garbage collection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any


class LocalClient:
    """Calls a service object in this process."""

    def __init__(self, service: Any) -> None:
        self.service = service

    async def call(self, method: str, *args: Any) -> Any:
        result = getattr(self.service, method)(*args)
        return await result if hasattr(result, "__await__") else result

    async def stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        async with aclosing(getattr(self.service, method)(*args)) as items:
            async for item in items:
                yield item


class HandleClient:
    """Calls a Ray Serve deployment through its DeploymentHandle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self.handle, method).remote(*args)

    async def stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        response = getattr(self.handle.options(stream=True), method).remote(*args)
        try:
            async for item in response:
                yield item
        finally:
            response.cancel()  # the replica's generator is closed too; a no-op once it has finished
