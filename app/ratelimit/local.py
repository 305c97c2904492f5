"""The limits one worker keeps by itself while Redis cannot be asked: each worker admits its share.

With W workers in all, a worker allows limit / W requests (and tokens) per window and about concurrency / W
requests at once, with the same GCRA and burst as `lua/acquire.lua`. Across the workers that approximates the
tenant's limit without any shared state: an outage is a slightly looser limit, not no limit at all. It forgets
nothing while Redis is back (the state is a few floats per tenant) and decides nothing then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.ratelimit.limiter import Limits, burst_units


@dataclass
class LocalHold:
    """What one locally admitted request holds: its token reservations and concurrency places, to give back."""

    token_keys: tuple[tuple[tuple[str, str | None], float, float], ...] = ()  # (scope, period, reserved)
    concurrency_keys: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class LocalDecision:
    allowed: bool
    retry_after: float = 0.0
    dimension: str | None = None
    hold: LocalHold | None = None


class LocalLimits:
    """Per-worker GCRA and concurrency counts for the tenants seen during an outage (pure: no I/O, no clock)."""

    def __init__(self, *, workers: int, burst: float) -> None:
        self.workers = max(1, workers)
        self.burst = burst
        self._tat: dict[tuple[str, str, str | None], float] = {}
        self._running: dict[tuple[str, str | None], int] = {}

    def acquire(self, tenant: str, scopes: list[tuple[str | None, Limits]], estimated_tokens: int,
                now: float) -> LocalDecision:
        """Admit on every dimension of every scope (the tenant's, its model's) or consume nothing."""
        writes: list[tuple[tuple[str, str, str | None], float]] = []
        tokens: list[tuple[tuple[str, str | None], float, float]] = []
        running: list[tuple[str, str | None]] = []
        for model, limits in scopes:
            for kind, limit in (("r", limits.rpm), ("t", limits.tpm)):
                if not limit:
                    continue
                share = limit / self.workers
                period = limits.window_seconds / share
                cost = 1.0 if kind == "r" else min(max(1.0, float(estimated_tokens)), share)
                tolerance = max(burst_units(share, self.burst), cost) * period
                tat = max(self._tat.get((tenant, kind, model), now), now)
                wait = tat + cost * period - tolerance - now
                if wait > 0:
                    return LocalDecision(False, wait, "requests" if kind == "r" else "tokens")
                writes.append(((tenant, kind, model), tat + cost * period))
                if kind == "t":
                    tokens.append(((tenant, model), period, cost))
            if limits.concurrency:
                share_c = math.ceil(limits.concurrency / self.workers)
                if self._running.get((tenant, model), 0) >= share_c:
                    return LocalDecision(False, 1.0, "concurrency")
                running.append((tenant, model))
        for key, tat in writes:
            self._tat[key] = tat
        for key in running:
            self._running[key] = self._running.get(key, 0) + 1
        return LocalDecision(True, hold=LocalHold(tuple(tokens), tuple(running)))

    def finish(self, hold: LocalHold, actual_tokens: int | None, now: float) -> None:
        """Settle the token reservations to the real usage (None keeps them) and give the places back."""
        if actual_tokens is not None:
            for (tenant, model), period, reserved in hold.token_keys:
                key = (tenant, "t", model)
                tat = max(self._tat.get(key, now), now) + (max(0, actual_tokens) - reserved) * period
                if tat > now:
                    self._tat[key] = tat
                else:
                    self._tat.pop(key, None)
        for key in hold.concurrency_keys:
            left = self._running.get(key, 0) - 1
            if left > 0:
                self._running[key] = left
            else:
                self._running.pop(key, None)
