"""Which key a request should use next (backends: backends.py; what the upstreams said about each key: health.py).

Choice: backends that serve the model, in weighted-random order; inside a backend, keys that are not
cooling down for that model nor ejected, preferring the fewest requests in flight (per worker) relative to the
key's weight. Cooldowns are shared through Redis (`KeyHealth`) so every worker and pod stops using a limited key.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

from app.upstream.backends import Backend, UpstreamKey
from app.upstream.health import KeyHealth

PANIC_THRESHOLD = 0.5  # below this share of healthy keys, ejected keys are used again (after the healthy ones)


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
