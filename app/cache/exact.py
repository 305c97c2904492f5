"""L1: exact answers in Redis, and the generation counters that make deletion instant everywhere.

Deleting "everything", a tenant's or a model's entries does not scan Redis: it bumps a generation that is
part of every key, so old entries become unreachable at once (and expire with their TTL), and each worker
notices within a second (`Generations.refresh`), clearing its L0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from app.cache.write_behind import Write, WriteBehind
from app.redis_client import REDIS_FAILURES, send_now

GENERATIONS_KEY = "gw:cache:gen"
ENTRY_PREFIX = "gw:c:"
EMBEDDINGS_PREFIX = "gw:ce:"  # /v1/embeddings answers: their own key space
REFRESH_SECONDS = 0.5


class Generations:
    """The worker's copy of the generation counters, re-read from Redis at most every REFRESH_SECONDS."""

    def __init__(self, redis_client: Any) -> None:
        self._redis = redis_client
        self._values: dict[str, int] = {}
        self._read_at = 0.0

    def refresh(self, now: float) -> bool:
        """Re-read if stale; True when something changed (the caller clears its L0)."""
        if now - self._read_at < REFRESH_SECONDS:
            return False
        raw = self._redis.hgetall(GENERATIONS_KEY)
        self._read_at = now
        values = {_text(k): int(v) for k, v in raw.items()}
        changed = values != self._values
        self._values = values
        return changed

    def age(self, now: float) -> float:
        """Seconds since the counters were last read from Redis (infinite before the first read, or after a bump
        this worker made, which it re-reads next)."""
        return now - self._read_at if self._read_at else float("inf")

    def tag(self, tenant: str, model: str) -> str:
        """The generation part of a key: any bump of these three counters changes it."""
        v = self._values
        return f"{v.get('*', 0)}.{v.get('t:' + tenant, 0)}.{v.get('m:' + model, 0)}"

    def bump(self, scope: str) -> None:
        """scope: `*`, `t:<tenant>` or `m:<model>`. This worker uses (and reports) the new value at once."""
        self._values[scope] = int(self._redis.hincrby(GENERATIONS_KEY, scope, 1))
        self._read_at = 0.0

    def snapshot(self) -> dict[str, int]:
        return dict(self._values)


class ExactStore:
    """L1 entries, one Redis string each: the absolute expiry on the first line, the answer after it.

    In a gevent worker a store's SET is not waited for: it waits in the cache's `WriteBehind` for the worker's next
    look-up, whose GET carries it (app/cache/write_behind.py). The answer's path does not wait for it, and under
    load one round trip carries many. The entry is in this worker's L0 at once; other workers find it in Redis a
    few milliseconds later. A SET that fails is reported to `on_error`. Outside gevent (tests, tools) every SET is
    sent at once.
    """

    def __init__(self, redis_client: Any, writes: WriteBehind,
                 on_error: Callable[[Exception], None] | None = None) -> None:
        self._redis = redis_client
        self._writes = writes
        self._on_error = on_error or (lambda exc: None)

    def get(self, key: str) -> tuple[bytes, float] | None:
        """The entry and its absolute expiry, in one GET (the expiry travels in the value's first line)."""
        return self.send_get(key)()

    def send_get(self, key: str) -> Callable[[], tuple[bytes, float] | None]:
        """The GET (behind the waiting writes: one round trip) sent now; the function returned reads the entry and
        must be called once. The caller works while the round trip travels (a cluster client's pipeline leaves when
        read: `send_now`)."""
        writes = self._writes.take()
        commands = [*(write.command for write in writes), ("GET", key)]
        try:
            read = send_now(self._redis, commands)
        except BaseException:  # not sent (or not known to be): the writes wait for the next round trip
            self._writes.put_back(writes)
            raise
        return lambda: self._entry(self._answered(writes, read))

    def _answered(self, writes: list[Write], read: Callable[[], list[Any]]) -> Any:
        """The GET's reply, the last; the writes ahead of it get theirs, a failed GET is raised."""
        try:
            *written, value = read()
        except REDIS_FAILURES as exc:
            self._writes.failed(writes, exc)
            raise
        except BaseException:  # cut by the request's Redis time: whether they landed is unknown
            self._writes.cut(writes)
            raise
        self._writes.answered(writes, written)
        if isinstance(value, Exception):
            raise value
        return value

    @staticmethod
    def _entry(value: bytes | None) -> tuple[bytes, float] | None:
        if value is None:
            return None
        head, sep, content = value.partition(b"\n")
        try:
            expires_at = float(head)
        except ValueError:
            return None  # not written by this gateway: a miss, and the next store replaces it
        return (content, expires_at) if sep else None

    def put(self, key: str, content: bytes, ttl: int) -> float:
        """Store for `ttl` seconds (see the class: in a gevent worker, soon); the absolute expiry L0 must keep."""
        expires_at = time.time() + ttl
        value = b"%.3f\n%s" % (expires_at, content)
        if not self._writes.waits():
            self._redis.set(key, value, ex=ttl)
        else:
            self._writes.add(Write(("SET", key, value, "EX", ttl), self._on_error, size=len(value)))
        return expires_at


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
