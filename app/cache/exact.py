"""L1: exact answers in Redis, and the generation counters that make deletion instant everywhere.

Deleting "everything", a tenant's or a model's entries does not scan Redis: it bumps a generation that is
part of every key, so old entries become unreachable at once (and expire with their TTL), and each worker
notices within a second (`Generations.refresh`), clearing its L0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from app.concurrency import Drops, gevent_patched, sleep, spawn
from app.redis_client import REDIS_FAILURES, send_now

GENERATIONS_KEY = "gw:cache:gen"
ENTRY_PREFIX = "gw:c:"
EMBEDDINGS_PREFIX = "gw:ce:"  # /v1/embeddings answers: their own key space
REFRESH_SECONDS = 0.5
#: How long a stored answer's SET waits for the worker's next look-up to carry it before it is sent alone.
WRITE_DELAY_SECONDS = 0.005
#: SETs that may wait at once in a worker (a safety net: a flush leaves every WRITE_DELAY_SECONDS).
MAX_PENDING_WRITES = 1000


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

    In a gevent worker a store is not waited for. Its SET rides in the worker's next look-up (one pipeline: the
    pending SETs, then the GET; one round trip for both) or, when no look-up comes within WRITE_DELAY_SECONDS,
    leaves on its own. The answer's path no longer waits for the SET, and under load one round trip carries
    many (fewer round trips and less CPU per request at c=32). One request at a time gains nothing on this
    project's VM: a Redis idle for a few ms answers ~0.3 ms slower, and the next GET now meets it. The entry is in
    this worker's L0 at once; other workers find it in Redis a few milliseconds later. At most `max_pending`
    SETs wait; past that a store is dropped (a future miss, never a wrong answer; counted, told to `on_drop` and
    logged), and a SET that fails is reported to `on_error`. Outside gevent (tests, tools) every SET is sent at once.
    """

    def __init__(self, redis_client: Any, *, max_pending: int = MAX_PENDING_WRITES,
                 on_error: Callable[[Exception], None] | None = None,
                 on_drop: Callable[[], None] | None = None) -> None:
        self._redis = redis_client
        self._max_pending = max_pending
        self._on_error = on_error or (lambda exc: None)
        self._drops = Drops("L1 stores waiting for Redis", f"{max_pending} SETs", on_drop)
        self._pending: list[tuple[str, bytes, int]] = []
        self._flushing = False

    def get(self, key: str) -> tuple[bytes, float] | None:
        """The entry and its absolute expiry, in one GET (the expiry travels in the value's first line)."""
        return self.send_get(key)()

    def send_get(self, key: str) -> Callable[[], tuple[bytes, float] | None]:
        """The GET (behind the waiting SETs: one round trip) sent now; the function returned reads the entry and
        must be called once. The caller works while the round trip travels; a cluster client sends it as a
        pipeline when read."""
        pending, self._pending = self._pending, []
        commands: list[tuple[Any, ...]] = [("SET", k, value, "EX", ttl) for k, value, ttl in pending]
        commands.append(("GET", key))
        read = send_now(self._redis, commands)
        if read is None:
            return lambda: self._read_pipeline(pending, key)
        return lambda: self._entry(self._answered(read()))

    def _read_pipeline(self, pending: list[tuple[str, bytes, int]], key: str) -> tuple[bytes, float] | None:
        pipe = self._pipeline(pending)
        pipe.get(key)
        return self._entry(self._answered(pipe.execute(raise_on_error=False)))

    def _answered(self, replies: list[Any]) -> Any:
        """The GET's reply, the last; a failed SET ahead of it is reported, a failed GET raised."""
        *written, value = replies
        self._report(written)
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
        if not gevent_patched():
            self._redis.set(key, value, ex=ttl)
            return expires_at
        if len(self._pending) >= self._max_pending:
            self._drops()
            return expires_at
        self._pending.append((key, value, ttl))
        if not self._flushing:
            self._flushing = True
            spawn(self._flush_soon)
        return expires_at

    def pending(self) -> int:
        return len(self._pending)

    @property
    def dropped(self) -> int:
        return self._drops.count

    def _flush_soon(self) -> None:
        """The SETs no look-up took within WRITE_DELAY_SECONDS, sent in one pipeline (a greenlet of its own)."""
        try:
            sleep(WRITE_DELAY_SECONDS)
        finally:
            self._flushing = False  # a store made while this one's SETs travel starts the next flush
        self.flush()

    def flush(self) -> None:
        """Send the waiting SETs now (also as the worker exits); a failure is reported to `on_error`, not raised."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            self._report(self._pipeline(pending).execute(raise_on_error=False))
        except REDIS_FAILURES as exc:
            self._on_error(exc)

    def _pipeline(self, writes: list[tuple[str, bytes, int]]) -> Any:
        pipe = self._redis.pipeline(transaction=False)
        for key, value, ttl in writes:
            pipe.set(key, value, ex=ttl)
        return pipe

    def _report(self, results: list[Any]) -> None:
        for result in results:
            if isinstance(result, Exception):
                self._on_error(result)
                return  # one report per batch: the same cause


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
