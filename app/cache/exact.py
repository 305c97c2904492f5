"""L1: exact answers in Redis, and the generation counters that make deletion instant everywhere.

Deleting "everything", a tenant's or a model's entries does not scan Redis: it bumps a generation that is
part of every key, so old entries become unreachable at once (and expire with their TTL), and each worker
notices within a second (`Generations.refresh`), clearing its L0.
"""

from __future__ import annotations

import time
from typing import Any

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
    def __init__(self, redis_client: Any) -> None:
        self._redis = redis_client

    def get(self, key: str) -> tuple[bytes, float] | None:
        """The entry and its absolute expiry, in one GET (the expiry travels in the value's first line)."""
        value = self._redis.get(key)
        if value is None:
            return None
        head, sep, content = value.partition(b"\n")
        try:
            expires_at = float(head)
        except ValueError:
            return None  # not written by this gateway: a miss, and the next store replaces it
        return (content, expires_at) if sep else None

    def put(self, key: str, content: bytes, ttl: int) -> float:
        """Store for `ttl` seconds; returns the absolute expiry L0 must not outlive."""
        expires_at = time.time() + ttl
        self._redis.set(key, b"%.3f\n%s" % (expires_at, content), ex=ttl)
        return expires_at


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
