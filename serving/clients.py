"""One calling convention for the services, whether they are local objects or Ray Serve deployments.

`call` awaits a method's result; `stream` iterates a method that yields. The OpenAI server is written
against this, so it runs unchanged in tests (local objects) and in Ray Serve (DeploymentHandles).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any


class LocalClient:
    """Calls a service object in this process."""

    def __init__(self, service: Any) -> None:
        self.service = service

    async def call(self, method: str, *args: Any) -> Any:
        result = getattr(self.service, method)(*args)
        return await result if hasattr(result, "__await__") else result

    def stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        return getattr(self.service, method)(*args)


class HandleClient:
    """Calls a Ray Serve deployment through its DeploymentHandle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self.handle, method).remote(*args)

    def stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        return getattr(self.handle.options(stream=True), method).remote(*args)
