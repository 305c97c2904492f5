"""L0: a per-worker LRU bounded by entries and bytes, in front of Redis.

Entries carry the absolute expiry they have in Redis, so L0 never outlives L1; deletions are seen through
the generation counter (see `exact.Generations`), which changes every key at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LocalEntry:
    content: bytes
    answer: dict[str, Any]
    expires_at: float


class LocalCache:
    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, LocalEntry] = OrderedDict()
        self._bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def get(self, key: str, now: float | None = None) -> LocalEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= (time.time() if now is None else now):
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: LocalEntry) -> None:
        size = len(entry.content)
        if key in self._entries:
            self._remove(key)  # even when the new answer is not kept: the old one is stale
        if not self.enabled or size > self.max_bytes:
            return
        self._entries[key] = entry
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= len(entry.content)
