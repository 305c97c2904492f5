"""The cache's Redis writes that ride the worker's next look-up: one round trip carries them with the look-up's GET.

A stored answer's L1 SET and its L2 entry are for later requests only. In a gevent worker neither is waited for:
they wait here until the worker's next look-up sends its GET (one pipeline: the waiting writes, then the GET), or,
when no look-up comes within WRITE_DELAY_SECONDS, leave on their own. Each round trip to Redis costs a worker more
than the work it carries (redis-py's connection handling, a system call that wakes Redis, the reply's read), and at
one request at a time on this project's VM a round trip from an idle worker is ~0.4 ms, so one round trip for a
new prompt's three commands instead of three pays at every concurrency. Other workers find the entries a few
milliseconds later; this worker's own L0 and L2 index have them at once (their stores put them there).

At most `max_pending` writes wait; past that a write is dropped (a future miss, never a wrong answer; counted, told
to `on_drop` and logged). Writes that fail are reported to their store's `on_error`, once per round trip however
many failed (the same cause). Outside gevent (tests, tools) nothing waits: the stores write at once (`waits`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from app.concurrency import Drops, gevent_patched, sleep, spawn
from app.redis_client import REDIS_FAILURES, is_cluster, send_now

#: How long a write waits for the worker's next look-up to carry it before it is sent alone.
WRITE_DELAY_SECONDS = 0.005
#: Writes, and their bytes, that may wait at once in a worker (a safety net: a flush leaves every
#: WRITE_DELAY_SECONDS). An answer of CACHE_MAX_ENTRY_BYTES travels twice (L1 and L2): the bytes bound the memory.
MAX_PENDING_WRITES = 1000
MAX_PENDING_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Write:
    """One Redis command to send later.

    `on_error` is its store's reporter (told once per round trip however many of its writes failed). `script`, for
    an EVALSHA, is the redis-py script it runs: when Redis no longer knows it (a fresh Redis, a restart, a SCRIPT
    FLUSH) one greenlet loads it and the write waits again. `on_settled` runs once the write's outcome is known or
    can no longer be (answered, failed, or cut mid-way), not when it is only put back to wait again. Callbacks run
    inside whichever round trip carried the write: quick, and never raising.
    """

    command: tuple[Any, ...]
    on_error: Callable[[Exception], None]
    size: int = 0  # bytes it holds while it waits
    script: Any = None
    on_settled: Callable[[], None] | None = None

    def settle(self) -> None:
        if self.on_settled is not None:
            self.on_settled()


class WriteBehind:
    def __init__(self, redis_client: Any, *, max_pending: int = MAX_PENDING_WRITES,
                 max_bytes: int = MAX_PENDING_BYTES, on_drop: Callable[[], None] | None = None) -> None:
        self._redis = redis_client
        self._drops = Drops("cache writes waiting for Redis", f"{max_pending} writes or {max_bytes} bytes", on_drop)
        self._max_pending = max_pending
        self._max_bytes = max_bytes
        self._pending: list[Write] = []
        self._bytes = 0
        self._flushing = False
        self.carries_scripts = not is_cluster(redis_client)  # a cluster pipeline refuses EVALSHA

    @staticmethod
    def waits() -> bool:
        """Whether writes wait here (a gevent worker) or are made at once by their stores (tests, tools)."""
        return gevent_patched()

    def add(self, write: Write) -> bool:
        """Queue `write` for the next look-up or the flush; False (dropped, counted, logged) when too many wait."""
        if len(self._pending) >= self._max_pending or self._bytes + write.size > self._max_bytes:
            self._drops()
            return False
        self._pending.append(write)
        self._bytes += write.size
        self._flush_later()
        return True

    def take(self) -> list[Write]:
        """The waiting writes, for a look-up to send ahead of its GET; it hands their replies to `answered`."""
        taken, self._pending, self._bytes = self._pending, [], 0
        return taken

    def put_back(self, writes: list[Write]) -> None:
        """Writes whose round trip was never sent (no connection in time, the request's Redis time spent): they wait
        again, first in line. Sending one twice is harmless: each sets the same value."""
        if writes:
            self._pending[:0] = writes
            self._bytes += sum(write.size for write in writes)
            self._flush_later()

    def answered(self, writes: list[Write], replies: list[Any]) -> None:
        """Redis's replies to `writes` (an error reply as its exception): failures reported, once per store."""
        failures: dict[Callable[[Exception], None], Exception] = {}
        unknown_script: list[Write] = []
        for write, reply in zip(writes, replies, strict=True):
            if isinstance(reply, redis.exceptions.NoScriptError) and write.script is not None:
                unknown_script.append(write)
                continue
            if isinstance(reply, Exception):
                failures.setdefault(write.on_error, reply)
            write.settle()
        for on_error, exc in failures.items():
            on_error(exc)
        if unknown_script:
            spawn(self._load_scripts, unknown_script)

    @staticmethod
    def failed(writes: list[Write], exc: Exception) -> None:
        """The round trip that carried `writes` failed: each store is told once."""
        for on_error in dict.fromkeys(write.on_error for write in writes):
            on_error(exc)
        for write in writes:
            write.settle()

    @staticmethod
    def cut(writes: list[Write]) -> None:
        """The round trip was cut after it was sent (the request's Redis time ran out): whether the writes landed is
        unknown. Not reported (the look-up counts the cut); a missing entry is a future miss."""
        for write in writes:
            write.settle()

    def pending(self) -> int:
        return len(self._pending)

    @property
    def dropped(self) -> int:
        return self._drops.count

    def _flush_later(self) -> None:
        if not self._flushing:
            self._flushing = True
            spawn(self._flush_soon)

    def _flush_soon(self) -> None:
        """The writes no look-up took within WRITE_DELAY_SECONDS, sent in one round trip (a greenlet of its own)."""
        try:
            sleep(WRITE_DELAY_SECONDS)
        finally:
            self._flushing = False  # a write queued while this one's travel starts the next flush
        self.flush()

    def _load_scripts(self, writes: list[Write]) -> None:
        """Load the scripts Redis did not know (once each, in this greenlet), then let their writes wait again."""
        try:
            for script in {id(write.script): write.script for write in writes}.values():
                self._redis.script_load(script.script)
        except REDIS_FAILURES as exc:
            self.failed(writes, exc)
            return
        self.put_back(writes)

    def flush(self) -> None:
        """Send the waiting writes now (also as the worker exits); failures are reported, never raised."""
        writes = self.take()
        if not writes:
            return
        try:
            replies = send_now(self._redis, [write.command for write in writes])()
        except REDIS_FAILURES as exc:
            self.failed(writes, exc)
            return
        self.answered(writes, replies)
