"""Backends, their keys, and which key a request should use next.

Choice: backends that serve the model, in weighted-random order; inside a backend, keys that are not
cooling down for that model nor ejected, preferring the fewest requests in flight (per worker) relative to the
key's weight. Cooldowns are shared through Redis (`KeyHealth`) so every worker and pod stops using a limited key.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.concurrency import gevent_patched, spawn
from app.config import ConfigError, http_base_url, read_yaml_file
from app.redis_client import REDIS_FAILURES

log = logging.getLogger(__name__)

DISABLED = float("inf")  # a key taken out (401/403) until an operator restores it
# Outlier ejection (Envoy's consecutive_5xx, base_ejection_time, max_ejection_time, panic threshold).
EJECT_AFTER_FAILURES = 3  # consecutive 5xx (per key and model) or connection failures (per key)
EJECT_BASE_SECONDS = 5.0  # the n-th ejection in a row lasts n times this...
EJECT_MAX_SECONDS = 300.0  # ...up to this
PANIC_THRESHOLD = 0.5  # below this share of healthy keys, ejected keys are used again (after the healthy ones)
DEPLETED_SECONDS = 60.0  # a key out of credit is tried last for this long
BACKOFF_COOLDOWN_MAX = 300.0
# Longest rest a Retry-After can buy a key. Upstreams may ask for hours (a spent daily quota); past this the key
# is tried again, and one that is still limited costs one request that moves on to another key.
RETRY_AFTER_COOLDOWN_MAX = 3600.0


def key_fingerprint(secret: str) -> str:
    """A short, stable, non-reversible id for logs and metrics: never the key itself."""
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class UpstreamKey:
    secret: str = field(repr=False)
    key_id: str
    weight: float = 1.0


@dataclass(frozen=True)
class Backend:
    name: str
    base_url: str
    keys: tuple[UpstreamKey, ...]
    weight: float = 1.0
    models: tuple[str, ...] = ()  # empty: serves any model
    model_map: Mapping[str, str] = field(default_factory=dict)

    def serves(self, model: str | None) -> bool:
        return not self.models or model in self.models or model in self.model_map

    def upstream_model(self, model: str) -> str:
        return self.model_map.get(model, model)


class PoolConfigError(ConfigError):
    """The backends description is unusable; the message says where."""


def backends_from_settings(target_url: str, keys: tuple[str, ...], upstreams_file: str | None) -> list[Backend]:
    """`UPSTREAMS_FILE` when given, else one backend from `TARGET_URL` + `UPSTREAM_API_KEYS`."""
    if upstreams_file:
        return load_backends_file(Path(upstreams_file))
    return [Backend(name="default", base_url=target_url, keys=_keys_or_anonymous([_make_key(k) for k in keys]))]


def _keys_or_anonymous(keys: list[UpstreamKey]) -> tuple[UpstreamKey, ...]:
    """A backend without keys (a local vLLM or Ollama) is called without an Authorization header."""
    return tuple(keys) or (UpstreamKey(secret="", key_id="anonymous"),)


def _make_key(secret: str, weight: float = 1.0) -> UpstreamKey:
    return UpstreamKey(secret=secret, key_id=key_fingerprint(secret), weight=weight)


def load_backends_file(path: Path) -> list[Backend]:
    """Parse the YAML backends file (see README, "Several upstreams"); every field is checked here, at start."""
    doc = read_yaml_file(path, "UPSTREAMS_FILE", PoolConfigError)
    items = doc.get("backends") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise PoolConfigError(f"UPSTREAMS_FILE {path}: expected a non-empty 'backends' list")
    backends: list[Backend] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        backend = _parse_backend(path, index, item)
        # Metrics, logs and the admin API tell backends apart by name: two of one name would be confused.
        if backend.name in seen:
            raise PoolConfigError(f"UPSTREAMS_FILE {path}: backends[{index}]: the name {backend.name!r} is "
                                  f"already used by backends[{seen[backend.name]}]; backend names must be unique")
        seen[backend.name] = index
        backends.append(backend)
    return backends


def _parse_backend(path: Path, index: int, item: Any) -> Backend:
    where = f"UPSTREAMS_FILE {path}: backends[{index}]"
    if not isinstance(item, dict):
        raise PoolConfigError(f"{where}: expected a mapping with a 'url'")
    name = item.get("name")
    if name is None:
        name = f"backend{index}"
    if not isinstance(name, str) or not name.strip():
        raise PoolConfigError(f"{where}: 'name' must be a non-empty string")
    where = f"{where} ({name!r})"
    return Backend(
        name=name,
        base_url=_base_url(item.get("url"), where),
        keys=_parse_keys(item, where),
        weight=_weight(item.get("weight", 1.0), f"{where}: 'weight'"),
        models=_model_names(item.get("models"), where),
        model_map=_model_map(item.get("model_map"), where),
    )


def _base_url(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PoolConfigError(f"{where}: needs a 'url' (http:// or https://)")
    try:
        return http_base_url(value)
    except ValueError as exc:
        raise PoolConfigError(f"{where}: 'url': {exc}") from None


def _weight(value: Any, where: str) -> float:
    """A finite number > 0 (a numeric string too: YAML 1.1 reads `1e3` as a string)."""
    if not isinstance(value, bool) and isinstance(value, int | float | str):
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if math.isfinite(weight) and weight > 0:
            return weight
    raise PoolConfigError(f"{where} must be a number greater than 0, got {value!r}")


def _parse_keys(item: dict[str, Any], where: str) -> tuple[UpstreamKey, ...]:
    """Left out: the backend is called without a key. Given: a non-empty list. Keys are never quoted."""
    if "keys" not in item:
        return _keys_or_anonymous([])
    raw_keys = item["keys"]
    if not isinstance(raw_keys, list) or not raw_keys:
        raise PoolConfigError(f"{where}: 'keys' must be a non-empty list (leave it out for a backend without keys)")
    keys: list[UpstreamKey] = []
    for i, raw in enumerate(raw_keys):
        if isinstance(raw, str) and raw.strip():
            keys.append(_make_key(raw))
        elif isinstance(raw, dict) and isinstance(raw.get("key"), str) and raw["key"].strip():
            keys.append(_make_key(raw["key"], _weight(raw.get("weight", 1.0), f"{where}: 'keys[{i}].weight'")))
        else:
            raise PoolConfigError(f"{where}: 'keys[{i}]' must be a non-empty string or {{key, weight}}")
    return tuple(keys)


def _model_names(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise PoolConfigError(f"{where}: 'models' must be a list of model names (strings)")
    return tuple(value)


def _model_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in value.items()
    ):
        raise PoolConfigError(f"{where}: 'model_map' must map model names to model names (strings)")
    return dict(value)


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


class UpstreamPool:
    """Orders (backend, key) candidates for one request; counts in-flight requests per key."""

    def __init__(self, backends: list[Backend], health: KeyHealth) -> None:
        self.backends = backends
        self.health = health
        self._in_flight: dict[str, int] = {}

    def knows_model(self, model: str | None) -> bool:
        return any(b.serves(model) for b in self.backends)

    def model_ids(self) -> list[str]:
        """Models named in the configuration (empty when a backend serves any model)."""
        seen: dict[str, None] = {}
        for backend in self.backends:
            for model in (*backend.models, *backend.model_map):
                seen.setdefault(model, None)
        return list(seen)

    def candidates(
        self, model: str | None, now: float | None = None
    ) -> tuple[list[tuple[Backend, UpstreamKey]], float]:
        """Usable (backend, key) pairs in preference order, and the soonest recovery when none is usable.

        Keys cooling down for this model (the upstream's 429) or disabled are left out. Ejected keys are left
        out too, unless fewer than `PANIC_THRESHOLD` of the remaining keys are healthy (Envoy's panic mode):
        then they follow the healthy ones, so a failing upstream's only key is never benched. Keys out of
        credit come after every other usable key.
        """
        now = time.time() if now is None else now
        serving = [b for b in self.backends if b.serves(model)]
        healthy: list[tuple[Backend, UpstreamKey]] = []
        ejected: list[tuple[Backend, UpstreamKey]] = []
        soonest = float("inf")
        for backend in _weighted_order(serving):
            usable = []
            for key in backend.keys:
                until = self.health.cooling_until(key.key_id, now, model)
                if until:
                    soonest = min(soonest, until)
                elif self.health.ejected_until(key.key_id, now, model):
                    ejected.append((backend, key))
                else:
                    usable.append(key)
            usable.sort(key=lambda k: (self._in_flight.get(k.key_id, 0) / k.weight, random.random()))
            healthy.extend((backend, key) for key in usable)
        ordered = healthy
        if ejected and len(healthy) < PANIC_THRESHOLD * (len(healthy) + len(ejected)):
            ordered = healthy + ejected
        if any(self.health.depleted(key.key_id, now) for _b, key in ordered):
            ordered = sorted(ordered, key=lambda pair: self.health.depleted(pair[1].key_id, now))  # stable
        return ordered, soonest

    def acquire(self, key: UpstreamKey) -> None:
        self._in_flight[key.key_id] = self._in_flight.get(key.key_id, 0) + 1

    def release(self, key: UpstreamKey) -> None:
        self._in_flight[key.key_id] = max(0, self._in_flight.get(key.key_id, 1) - 1)

    def key_states(self, now: float | None = None) -> Iterator[tuple[str, str, str]]:
        now = time.time() if now is None else now
        for backend in self.backends:
            for key in backend.keys:
                yield backend.name, key.key_id, self.health.state(key.key_id, now)


def _weighted_order(backends: list[Backend]) -> list[Backend]:
    """Weighted random order without replacement (Efraimidis-Spirakis keys)."""
    if len(backends) <= 1:
        return backends
    return sorted(backends, key=lambda b: -(random.random() ** (1.0 / max(b.weight, 1e-9))))


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
