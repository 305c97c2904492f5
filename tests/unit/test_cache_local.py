"""L0, the per-worker LRU: bounded by entries and bytes, never serving past the entry's expiry."""

from __future__ import annotations

from app.cache.local import LocalCache, LocalEntry

NOW = 1_000_000.0


def entry(content: bytes = b"x", expires_at: float = NOW + 60) -> LocalEntry:
    return LocalEntry(content, {"content": content.decode()}, expires_at)


def test_put_then_get() -> None:
    """A stored entry comes back until it expires."""
    cache = LocalCache(10, 1000)
    cache.put("k", entry(b"hello"))
    got = cache.get("k", now=NOW)
    assert got is not None and got.content == b"hello"
    assert cache.get("other", now=NOW) is None


def test_expired_entry_is_gone() -> None:
    """At or after its expiry an entry is a miss, and its bytes are freed."""
    cache = LocalCache(10, 1000)
    cache.put("k", entry(b"hello", expires_at=NOW + 1))
    assert cache.get("k", now=NOW + 0.999) is not None
    assert cache.get("k", now=NOW + 1) is None
    assert len(cache) == 0 and cache.size_bytes == 0


def test_entry_bound_evicts_least_recently_used() -> None:
    """Past max_entries the least recently used entry goes, not the one just read."""
    cache = LocalCache(2, 1000)
    cache.put("a", entry())
    cache.put("b", entry())
    assert cache.get("a", now=NOW) is not None  # "b" is now the oldest use
    cache.put("c", entry())
    assert len(cache) == 2
    assert cache.get("b", now=NOW) is None
    assert cache.get("a", now=NOW) is not None and cache.get("c", now=NOW) is not None


def test_byte_bound_evicts_until_it_fits() -> None:
    """The total content size never exceeds max_bytes; the oldest entries make room."""
    cache = LocalCache(100, 10)
    cache.put("a", entry(b"1234"))
    cache.put("b", entry(b"1234"))
    cache.put("c", entry(b"1234"))
    assert cache.size_bytes <= 10
    assert cache.get("a", now=NOW) is None
    assert cache.get("b", now=NOW) is not None and cache.get("c", now=NOW) is not None


def test_entry_larger_than_the_whole_cache_is_not_kept() -> None:
    """One answer bigger than max_bytes is not stored and does not flush the others."""
    cache = LocalCache(100, 10)
    cache.put("a", entry(b"1234"))
    cache.put("big", entry(b"x" * 11))
    assert cache.get("big", now=NOW) is None
    assert cache.get("a", now=NOW) is not None
    assert cache.size_bytes == 4


def test_replacing_an_entry_counts_its_bytes_once() -> None:
    """Writing the same key again replaces the entry and its size."""
    cache = LocalCache(10, 100)
    cache.put("k", entry(b"12345"))
    cache.put("k", entry(b"12"))
    assert len(cache) == 1 and cache.size_bytes == 2
    got = cache.get("k", now=NOW)
    assert got is not None and got.content == b"12"


def test_replacement_too_big_for_l0_does_not_leave_the_old_answer() -> None:
    """A refreshed answer too large for L0 must not leave the stale one there to be served."""
    cache = LocalCache(10, 10)
    cache.put("k", entry(b"old"))
    cache.put("k", entry(b"refreshed-and-long"))
    got = cache.get("k", now=NOW)
    assert got is None or got.content == b"refreshed-and-long"


def test_disabled_cache_stores_nothing() -> None:
    """LOCAL_CACHE_SIZE=0 turns L0 off."""
    cache = LocalCache(0, 1000)
    assert not cache.enabled
    cache.put("k", entry())
    assert cache.get("k", now=NOW) is None and len(cache) == 0


def test_clear_empties_everything() -> None:
    """clear() (after an admin delete) drops every entry and its bytes."""
    cache = LocalCache(10, 100)
    cache.put("a", entry(b"123"))
    cache.put("b", entry(b"45"))
    cache.clear()
    assert len(cache) == 0 and cache.size_bytes == 0
    assert cache.get("a", now=NOW) is None
