"""What the upstreams said about each key (cooldowns, disabled keys, ejection, credit), shared through Redis.

The choice of a key reads it (pool.py); the client writes it from each answer (client.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from app.concurrency import gevent_patched, spawn
from app.redis_client import REDIS_FAILURES

log = logging.getLogger(__name__)

DISABLED = float("inf")  # a key taken out (401/403) until an operator restores it
# Outlier ejection (Envoy's consecutive_5xx, base_ejection_time, max_ejection_time, panic threshold).
EJECT_AFTER_FAILURES = 3  # consecutive 5xx (per key and model) or connection failures (per key)
EJECT_BASE_SECONDS = 5.0  # the n-th ejection in a row lasts n times this...
EJECT_MAX_SECONDS = 300.0  # ...up to this
DEPLETED_SECONDS = 60.0  # a key out of credit is tried last for this long
BACKOFF_COOLDOWN_MAX = 300.0
# Longest rest a Retry-After can buy a key. Upstreams may ask for hours (a spent daily quota); past this the key
# is tried again, and one that is still limited costs one request that moves on to another key.
RETRY_AFTER_COOLDOWN_MAX = 3600.0


class KeyHealth:
    """What the upstream said about each key, per model where the provider limits per model.

    Three kinds of state, as the providers and Envoy's outlier detection have them:
    - rate-limit cooldowns (429 with or without Retry-After) per (key, model): OpenAI limits per model and
      DeepSeek overloads per model, so one model's 429 never rests the key for another model. Shared through
      one Redis hash (field `key_id|model`), read at most once a second per worker;
    - disabled keys (401/403) for every model, until an operator restores them (field `key_id`, shared);
    - outlier ejection for failures (5xx per (key, model), connection failures per key): after
      `EJECT_AFTER_FAILURES` consecutive failures the pair is ejected for `EJECT_BASE_SECONDS` times the number
      of its ejections (capped at `EJECT_MAX_SECONDS`). Ejection is this worker's own view, as each Envoy's is,
      and never removes the last usable key: the pool's panic threshold puts ejected keys back in use.
    A credit-exhausted key (402, 429 `insufficient_quota`) is only demoted: tried after keys that still have credit.
    """

    REDIS_KEY = "gw:upstream:cooldown"
    REFRESH_SECONDS = 1.0
    REFRESH_WAIT = 0.05  # how long a request waits for the refresh it started (a healthy Redis takes ~1 ms)

    def __init__(self, redis_client: Any | None) -> None:
        self._redis = redis_client
        self._until: dict[str, float] = {}
        self._strikes: dict[str, int] = {}
        self._failures: dict[str, int] = {}
        self._ejections: dict[str, int] = {}
        self._ejected: dict[str, float] = {}
        self._depleted: dict[str, float] = {}
        self._refreshed = 0.0
        self._refreshing = False
        self._lock = threading.Lock()
        # Local marks a refresh must not drop although Redis lacks them: those Redis never heard of (it was
        # down) and those made while the refresh's HGETALL was in flight. Any other mark missing from Redis
        # was restored by an operator.
        self._unshared: set[str] = set()
        self._marks = 0
        self._marked_at: dict[str, int] = {}

    def cooling_until(self, key_id: str, now: float, model: str | None = None) -> float:
        """When the key may serve `model` again after a 429 (DISABLED when rejected); 0.0 when it may now."""
        self._maybe_refresh(now)
        until = max(self._until.get(key_id, 0.0), self._until.get(_field(key_id, model), 0.0))
        return until if until > now else 0.0

    def cool_down(self, key_id: str, seconds: float | None, now: float | None = None,
                  model: str | None = None) -> float:
        """Rest a key for one model for `seconds` (Retry-After), or an exponential backoff when none was given."""
        now = time.time() if now is None else now
        name = _field(key_id, model)
        if seconds is None or math.isnan(seconds):
            strikes = self._strikes.get(name, 0) + 1
            self._strikes[name] = strikes
            seconds = min(BACKOFF_COOLDOWN_MAX, 2.0 ** min(strikes, 32))  # 2.0**1024 would overflow
        # A Retry-After of hours, or one too large for a float, must not take the key out for good.
        until = now + min(max(seconds, 0.001), RETRY_AFTER_COOLDOWN_MAX)
        self._set(name, until)
        return until

    def disable(self, key_id: str) -> None:
        """401/403: the credentials are bad for every model."""
        self._set(key_id, DISABLED)

    def record_failure(self, key_id: str, model: str | None = None, now: float | None = None) -> bool:
        """A 5xx for `model` (or, with model None, a connection failure of the key); True when it ejected."""
        now = time.time() if now is None else now
        name = _scope(key_id, model)
        count = self._failures.get(name, 0) + 1
        self._failures[name] = count
        if count < EJECT_AFTER_FAILURES:
            return False
        self._failures[name] = 0
        ejections = self._ejections.get(name, 0) + 1
        self._ejections[name] = ejections
        self._ejected[name] = now + min(EJECT_MAX_SECONDS, EJECT_BASE_SECONDS * ejections)
        return True

    def ejected_until(self, key_id: str, now: float, model: str | None = None) -> float:
        until = max(self._ejected.get(_scope(key_id, None), 0.0), self._ejected.get(_scope(key_id, model), 0.0))
        return until if until > now else 0.0

    def record_success(self, key_id: str, model: str | None = None) -> None:
        """An answer: the failure streaks end; each success takes one step off the ejection multiplier."""
        for name in (_scope(key_id, None), _scope(key_id, model)):
            self._failures.pop(name, None)
            if name in self._ejections and not self._ejected.get(name, 0.0) > time.time():
                self._ejections[name] -= 1
                if self._ejections[name] <= 0:
                    del self._ejections[name]
        self._strikes.pop(_field(key_id, model), None)

    def deplete(self, key_id: str, now: float | None = None) -> None:
        """Out of credit (402, insufficient_quota): tried after the keys that still have some, for a while."""
        self._depleted[key_id] = (time.time() if now is None else now) + DEPLETED_SECONDS

    def depleted(self, key_id: str, now: float) -> bool:
        return self._depleted.get(key_id, 0.0) > now

    def state(self, key_id: str, now: float) -> str:
        """The key's worst state over its models, for the key-state gauge."""
        self._maybe_refresh(now)
        if self._until.get(key_id) == DISABLED:
            return "disabled"
        prefix = key_id + "|"
        if any(until > now for name, until in self._until.items() if name == key_id or name.startswith(prefix)):
            return "cooling"
        if any(until > now for name, until in self._ejected.items() if name == key_id or name.startswith(prefix)):
            return "ejected"
        return "ok"

    def _set(self, name: str, until: float) -> None:
        self._until[name] = until
        self._marks += 1
        self._marked_at[name] = self._marks
        if self._redis is None:
            return
        try:
            self._redis.hset(self.REDIS_KEY, name, "disabled" if until == DISABLED else repr(until))
        except REDIS_FAILURES as exc:  # Redis down: the local view still protects this worker
            self._unshared.add(name)
            log.warning("upstream key state not shared, Redis unavailable: %s", type(exc).__name__)
        else:
            self._unshared.discard(name)

    def _maybe_refresh(self, now: float) -> None:
        if self._redis is None or now - self._refreshed < self.REFRESH_SECONDS:
            return
        if self._refreshing:
            return
        if gevent_patched():
            # In a greenlet of its own, waited for only briefly: a slow Redis must not hold the request that
            # happens to come due (it goes on with the view it has, a second old at most).
            self._refreshing = True
            spawn(self._refresh, now).join(timeout=self.REFRESH_WAIT)
            return
        self._refresh(now)

    def _refresh(self, now: float) -> None:
        try:
            self._read_shared(now)
        finally:
            self._refreshing = False

    def _read_shared(self, now: float) -> None:
        with self._lock:
            if now - self._refreshed < self.REFRESH_SECONDS:
                return
            self._refreshed = now
            marks_before = self._marks
            try:
                shared = self._redis.hgetall(self.REDIS_KEY)
            except REDIS_FAILURES as exc:  # keep the local view until Redis answers again
                log.debug("upstream key states not refreshed: %s", type(exc).__name__)
                return
        fresh: dict[str, float] = {}
        for raw_name, raw_until in shared.items():
            name = raw_name.decode(errors="replace") if isinstance(raw_name, bytes) else raw_name
            until = _shared_until(raw_until)
            if until is None:
                log.warning("ignored an unreadable upstream key state in Redis (%s)", self.REDIS_KEY)
                continue
            fresh[name] = until
        for name, until in self._until.items():
            if until > now and name not in fresh and (
                name in self._unshared or self._marked_at.get(name, 0) > marks_before
            ):
                fresh[name] = until  # a mark Redis has not seen yet; any other one was restored
        self._until = fresh

    def restore(self, key_id: str) -> None:
        """Operator action: put a disabled or cooling key back in service everywhere, for every model."""
        prefix = key_id + "|"

        def mine(name: str) -> bool:
            return name == key_id or name.startswith(prefix)

        for table in (self._until, self._strikes, self._failures, self._ejections, self._ejected):
            for name in [n for n in table if mine(n)]:
                del table[name]
        self._depleted.pop(key_id, None)
        self._unshared = {n for n in self._unshared if not mine(n)}
        if self._redis is not None:
            names = [n for n in self._redis.hkeys(self.REDIS_KEY)
                     if mine(n.decode(errors="replace") if isinstance(n, bytes) else n)]
            self._redis.hdel(self.REDIS_KEY, key_id, *names)


def _field(key_id: str, model: str | None) -> str:
    """The Redis field of a per-model cooldown; a request without a model (the model list) has its own."""
    return f"{key_id}|{model or ''}"


def _scope(key_id: str, model: str | None) -> str:
    """Ejection scope: the key for one model (5xx), or the whole key (model None: its connection failed)."""
    return key_id if model is None else f"{key_id}|{model}"


def _shared_until(raw: Any) -> float | None:
    """A key state as another worker wrote it: "disabled" or a finite timestamp; None for anything else."""
    value = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    if value == "disabled":
        return DISABLED
    try:
        until = float(value)
    except ValueError:
        return None
    return until if math.isfinite(until) else None
