"""Daily spend rollups per tenant and model in Redis, written off the request path, read by `/admin/spend`.

Layout (Redis Cluster safe: every write touches one key, and the read knows its keys without SCAN):
- `gw:{tenant}:spend:<YYYYMMDD>:<model>`: a hash of integer counters (ROLLUP_FIELDS) for one UTC day.
- `gw:spend:days:<YYYYMMDD>`: the set of `[tenant, model]` (JSON) pairs that have a rollup that day.
Both expire SPEND_RETENTION_DAYS after their day. A worker adds up its requests in memory and writes them every
FLUSH_SECONDS in one pipeline (HINCRBY per field: single-key commands, so a cluster pipeline splits by node);
a pair joins a day's set once per worker. A failed write is kept and tried again; a worker killed without a
graceful stop loses at most its last FLUSH_SECONDS of rollups (never a budget: those are the limiter's).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any

from app.breaker import Breaker
from app.concurrency import Drops, gevent_patched, sleep, spawn
from app.observability import metrics
from app.ratelimit.limiter import model_part, tenant_tag
from app.redis_client import REDIS_FAILURES, opens_breaker
from app.spend.prices import usd

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
MAX_PENDING = 50_000  # distinct (tenant, model, day) waiting for Redis; beyond it new ones are dropped and counted
LAYERS = ("L0", "L1", "L2")
ROLLUP_FIELDS = ("requests", "cache_hits", "input_tokens", "cached_input_tokens", "output_tokens", "cost_nanos",
                 "saved_tokens", "saved_nanos", *(f"hits_{layer}" for layer in LAYERS),
                 *(f"saved_nanos_{layer}" for layer in LAYERS))
GROUPS = ("tenant", "model", "day")

Pair = tuple[str, str, str]  # (tenant, model, day as YYYYMMDD)


@lru_cache(maxsize=4)
def _day_id(day_number: int) -> str:
    return datetime.fromtimestamp(day_number * 86400, UTC).strftime("%Y%m%d")


def day_of(now: float) -> str:
    """The UTC day of `now` as YYYYMMDD; formatted once per day (every answered request asks)."""
    return _day_id(int(now // 86400))


class SpendLedger:
    """A worker's rollup buffer and the admin read. ``background``: flush from a greenlet (None: whenever gevent
    runs, as in the gunicorn worker); otherwise `flush()` is called by whoever needs the rollups written."""

    def __init__(self, redis: Any, breaker: Breaker, *, retention_days: int, prefix: str = "gw",
                 background: bool | None = None) -> None:
        self.redis = redis
        self.breaker = breaker
        self.retention_days = retention_days
        self.prefix = prefix
        self.background = gevent_patched() if background is None else background
        self._pending: dict[Pair, Counter[str]] = {}
        self._indexed: set[Pair] = set()  # pairs this worker has put in their day's set
        self._flusher: Any = None
        self._drops = Drops("spend records waiting for Redis", f"{MAX_PENDING} tenant/model/day pairs",
                            metrics.BACKGROUND_DROPPED.labels("spend").inc)

    def rollup_key(self, tenant: str, model: str, day: str) -> str:
        return f"{self.prefix}:{tenant_tag(tenant)}:spend:{day}:{model_part(model)}"

    def day_key(self, day: str) -> str:
        return f"{self.prefix}:spend:days:{day}"

    def add(self, tenant: str, model: str, day: str, counts: Mapping[str, int]) -> None:
        """Add one request's counts to the buffer (written within FLUSH_SECONDS)."""
        pair = (tenant, model, day)
        pending = self._pending.get(pair)
        if pending is None:
            if len(self._pending) >= MAX_PENDING:
                self._drops()
                return
            pending = self._pending[pair] = Counter()
        pending.update(counts)
        if self.background and self._flusher is None:
            self._flusher = spawn(self._flush_forever)

    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        """Write the buffer in one pipeline; on a Redis failure it is kept (added to what came since) and raised."""
        batch, self._pending = self._pending, {}
        if not batch:
            return
        new = [pair for pair in batch if pair not in self._indexed]
        try:
            pipe = self.redis.pipeline(transaction=False)
            for (tenant, model, day), counts in batch.items():
                key = self.rollup_key(tenant, model, day)
                for name, value in counts.items():
                    if value:
                        pipe.hincrby(key, name, value)
                pipe.expireat(key, self._expiry(day))
            for tenant, model, day in new:
                pipe.sadd(self.day_key(day), json.dumps([tenant, model]))
                pipe.expireat(self.day_key(day), self._expiry(day))
            pipe.execute()
        except REDIS_FAILURES:
            for pair, counts in batch.items():
                self._pending.setdefault(pair, Counter()).update(counts)
            raise
        if len(self._indexed) > MAX_PENDING:
            self._indexed.clear()  # only costs a repeated SADD per pair
        self._indexed.update(new)

    def flush_quietly(self) -> None:
        """A last flush (worker exit): failures are logged, not raised."""
        try:
            self.flush()
        except REDIS_FAILURES as exc:
            log.warning("spend rollups not written at exit (%s): %d pairs lost", type(exc).__name__,
                        len(self._pending))

    def _flush_forever(self) -> None:
        while True:
            sleep(FLUSH_SECONDS)
            started = time.time()
            if not self._pending or not self.breaker.available(started):
                continue
            try:
                self.flush()
            except REDIS_FAILURES as exc:
                metrics.REDIS_ERRORS.labels("spend").inc()
                if opens_breaker(exc):
                    self.breaker.failed(time.time())
                log.warning("spend rollups deferred (%s)", type(exc).__name__)
                continue
            self.breaker.succeeded(started)

    def _expiry(self, day: str) -> int:
        start = datetime.strptime(day, "%Y%m%d").replace(tzinfo=UTC)
        return int((start + timedelta(days=1 + self.retention_days)).timestamp())

    # -- the admin read ---------------------------------------------------------------------------------------------

    def report(self, days: Iterable[date], *, tenant: str | None = None, model: str | None = None,
               group_by: tuple[str, ...] = ("tenant", "model")) -> list[dict[str, Any]]:
        """Rollups of `days`, filtered by tenant and model, added up per group (fields named in `group_by`).

        Two pipelined reads: the days' sets of pairs, then each pair's hash.
        """
        day_ids = [d.strftime("%Y%m%d") for d in days]
        pipe = self.redis.pipeline(transaction=False)
        for day in day_ids:
            pipe.smembers(self.day_key(day))
        pairs: list[Pair] = []
        for day, members in zip(day_ids, pipe.execute(), strict=True):
            for member in sorted(members):
                pair_tenant, pair_model = json.loads(member)
                if (tenant is None or pair_tenant == tenant) and (model is None or pair_model == model):
                    pairs.append((pair_tenant, pair_model, day))
        if not pairs:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for pair in pairs:
            pipe.hgetall(self.rollup_key(*pair))
        groups: dict[tuple[str, ...], Counter[str]] = {}
        for (pair_tenant, pair_model, day), raw in zip(pairs, pipe.execute(), strict=True):
            values = {"tenant": pair_tenant, "model": pair_model, "day": f"{day[:4]}-{day[4:6]}-{day[6:]}"}
            group = tuple(values[name] for name in group_by)
            groups.setdefault(group, Counter()).update({k.decode(): int(v) for k, v in raw.items()})
        return [_row(dict(zip(group_by, group, strict=True)), counts) for group, counts in sorted(groups.items())]


def _row(group: dict[str, str], counts: Counter[str]) -> dict[str, Any]:
    return {
        **group,
        "requests": counts["requests"], "cache_hits": counts["cache_hits"],
        "input_tokens": counts["input_tokens"], "cached_input_tokens": counts["cached_input_tokens"],
        "output_tokens": counts["output_tokens"], "cost_usd": usd(counts["cost_nanos"]),
        "saved_tokens": counts["saved_tokens"], "saved_usd": usd(counts["saved_nanos"]),
        "cache_hits_by_layer": {layer: counts[f"hits_{layer}"] for layer in LAYERS},
        "saved_usd_by_layer": {layer: usd(counts[f"saved_nanos_{layer}"]) for layer in LAYERS},
    }
