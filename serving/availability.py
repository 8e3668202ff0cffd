"""Which deployments can answer right now, as Ray Serve's controller sees them.

A request for a deployment without a running replica (its node is gone, Serve is restarting it) would wait
in the handle's queue until one comes back, however long that takes. Instead the Ingress refuses it at once
with 503 and Retry-After (`Unavailable`). The controller is polled in the background (once a second), so the
check on the request path is a lookup. A call already waiting when its deployment loses its last replica (a
request queued for a replica that died, which Serve would hold until a new one starts) is cancelled and
refused the same way, as is a call whose replica dies under it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence

from serving.errors import APIError

log = logging.getLogger(__name__)


class Refused(APIError):
    """A part of the application cannot take the call now; the client should retry after `retry_after_s`."""

    def __init__(self, status: int, message: str, code: str, retry_after_s: float) -> None:
        super().__init__(status, message, "server_error", code=code, retry_after=max(1, math.ceil(retry_after_s)))


class Unavailable(Refused):
    """503: a part of the application has no running replica."""

    def __init__(self, part: str, retry_after_s: float) -> None:
        message = f"The {part} is unavailable (its replica is restarting or its node is down); retry shortly."
        super().__init__(503, message, "unavailable", retry_after_s)


class Overloaded(Refused):
    """429: a deployment behind the Ingress refused the call because its queue is full (Ray Serve's
    `max_queued_requests`); in OpenAI's error shape, with Retry-After."""

    def __init__(self, part: str, retry_after_s: float) -> None:
        super().__init__(429, f"The {part} is at capacity; retry shortly.", "overloaded", retry_after_s)


class ServeAvailability:
    """Running replicas per deployment of one Serve application, refreshed every `interval_s` seconds.

    Until the first answer arrives every deployment counts as running, so a slow controller never refuses
    requests on its own account.
    """

    def __init__(self, app_name: str, interval_s: float = 1.0) -> None:
        self.app_name = app_name
        self.interval_s = interval_s
        self._running: dict[str, int] = {}
        self._task: asyncio.Task | None = None

    def running(self, deployment: str) -> bool:
        """Whether `deployment` has a running replica, as of the last poll."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="serve-availability")
        return self._running.get(deployment, 1) > 0

    async def until_down(self, deployments: Sequence[str]) -> None:
        """Return once any of `deployments` has no running replica (a call waiting on it never will answer)."""
        while all(self.running(name) for name in deployments):
            await asyncio.sleep(self.interval_s / 2)

    async def _poll(self) -> None:
        from ray import serve

        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                app = status.applications.get(self.app_name)
                if app is not None:
                    self._running = {
                        name: int(d.replica_states.get("RUNNING", 0)) for name, d in app.deployments.items()
                    }
            except Exception:
                log.warning("could not read Ray Serve's status; keeping the last known one", exc_info=True)
            await asyncio.sleep(self.interval_s)
