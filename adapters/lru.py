"""`ByteLRU`: a mapping whose values' sizes stay within a byte budget, least recently used out first.

What the adapter cache and the session store both are underneath: each value has a size in bytes
(`size(value)`), the sizes add up to at most `max_bytes`, and a value that would pass the budget pushes
out the least recently used (read or written) ones. A value larger than the whole budget is not kept.
Not thread-safe: its owners lock around their own compound operations.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """Values by key within `max_bytes`, evicting the least recently used."""

    def __init__(self, max_bytes: int, size: Callable[[V], int]) -> None:
        self.max_bytes = max_bytes
        self._size = size
        self._values: OrderedDict[str, V] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def items(self) -> list[tuple[str, V]]:
        return list(self._values.items())

    def get(self, key: str) -> V | None:
        """`key`'s value, now the most recently used; None if absent."""
        found = self._values.get(key)
        if found is not None:
            self._values.move_to_end(key)
        return found

    def put(self, key: str, value: V) -> None:
        """Keep `value` under `key` (replacing what was there), then evict down to the budget."""
        self.pop(key)
        size = self._size(value)
        if size > self.max_bytes:
            return
        self._values[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            self.pop(next(iter(self._values)))

    def pop(self, key: str) -> V | None:
        """Remove `key`; its value, or None if absent."""
        found = self._values.pop(key, None)
        if found is not None:
            self.bytes -= self._size(found)
        return found
