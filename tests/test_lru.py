"""The byte-budgeted LRU under the adapter cache and the session store: sizes add up, reads and writes count
as use, the least recently used leave first, and a value larger than the budget is never kept."""

from __future__ import annotations

from adapters.lru import ByteLRU


def test_evicts_the_least_recently_used_within_the_budget():
    lru: ByteLRU[bytes] = ByteLRU(10, len)
    lru.put("a", b"1234")
    lru.put("b", b"1234")
    assert lru.get("a") == b"1234"  # "b" is now the least recently used
    lru.put("c", b"1234")
    assert list(lru) == ["a", "c"] and lru.bytes == 8 and lru.get("b") is None


def test_replacing_a_value_recounts_its_bytes():
    lru: ByteLRU[bytes] = ByteLRU(10, len)
    lru.put("a", b"123456")
    lru.put("a", b"12")
    assert (len(lru), lru.bytes) == (1, 2)
    assert lru.pop("a") == b"12" and lru.bytes == 0 and lru.pop("a") is None


def test_a_value_over_the_whole_budget_is_not_kept_and_evicts_nothing():
    lru: ByteLRU[bytes] = ByteLRU(10, len)
    lru.put("a", b"1234")
    lru.put("big", b"x" * 11)
    assert list(lru) == ["a"] and lru.bytes == 4
