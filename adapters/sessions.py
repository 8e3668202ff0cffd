"""`SessionStore`: conversations that learn once. A session keeps its adapter's whole training state
(`SlotState`: weights and optimizer), the documents trained on so far (with their embeddings, which the
next turn's selection conditions on) and its turn count, between the turns of one conversation.

Bounded three ways: a session unused for `ttl_s` expires; the states' bytes stay within `max_bytes`, least
recently used out first; a session that reached `max_turns` starts over. An expired, evicted or unknown
session is simply not there: the turn starts fresh and says why (`Opened.fresh`). State lives only in this
object's memory (never on disk, never in the engine): once a session is dropped, nothing of it is left.
Keys are opaque to the store; the server namespaces them by caller, so one caller never reaches another's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from adapters.lru import ByteLRU
from adapters.state import SlotState
from selection.selector import GivenDocument


class Fresh(StrEnum):
    """Why a turn did not continue a session."""

    NEW = "new"
    """The session id was never seen (or was deleted or evicted)."""
    EXPIRED = "expired"
    """It was unused for longer than the time to live."""
    MAX_TURNS = "max_turns"
    """It had reached the most turns one session may take."""


@dataclass(frozen=True)
class Session:
    """What a conversation carries into its next turn."""

    state: SlotState
    documents: tuple[GivenDocument, ...]
    """Every document trained on so far, in order (repeats included)."""
    turns: int


@dataclass(frozen=True)
class Opened:
    """A turn's start: the session to continue (None: start fresh) and, when fresh, why."""

    session: Session | None
    fresh: Fresh | None = None


class SessionStore:
    """Sessions by key, within a time to live, a byte budget and a turn cap (thread-safe)."""

    def __init__(
        self, ttl_s: float, max_bytes: int, max_turns: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s, self.max_turns, self.clock = ttl_s, max_turns, clock
        self._sessions: ByteLRU[tuple[Session, float]] = ByteLRU(max_bytes, lambda entry: entry[0].state.nbytes)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def bytes(self) -> int:
        return self._sessions.bytes

    def open(self, key: str) -> Opened:
        """The session to continue for `key`, or why the turn starts fresh (every expired session goes)."""
        with self._lock:
            found = self._sessions.get(key)
            expired = found is not None and self.clock() - found[1] > self.ttl_s
            self._expire()
            if found is None or expired:
                return Opened(None, Fresh.EXPIRED if expired else Fresh.NEW)
            session, _ = found
            if session.turns >= self.max_turns:
                self._sessions.pop(key)
                return Opened(None, Fresh.MAX_TURNS)
            return Opened(session)

    def save(self, key: str, session: Session) -> None:
        """Keep `session` under `key` (replacing what was there); evict the least recently used over budget.
        A state larger than the whole budget is not kept."""
        with self._lock:
            self._sessions.put(key, (session, self.clock()))

    def drop(self, key: str) -> bool:
        """Delete `key`'s session now; whether there was one."""
        with self._lock:
            return self._sessions.pop(key) is not None

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, (_, used) in self._sessions.items() if now - used > self.ttl_s]:
            self._sessions.pop(key)
