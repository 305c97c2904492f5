"""Admission: a tenant's limits -> one limiter call, with the fail-open/closed decision made here only.

A refused request raises `RateLimited` carrying OpenAI's headers and `Retry-After`; an admitted one gets a
`Ticket` that is finished when the answer ends (real token usage settled, concurrency slot released). While it
runs, a greenlet renews its concurrency leases, so a stream of any length keeps its slot.

When the limiter cannot decide, the request is admitted (fail open) or refused with a 503 (fail closed). Only
Redis being down opens the breaker (the next second's requests skip Redis); an error answer to one call (a
script bug, an argument out of range) fails that request alone.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.auth import Tenant, TenantLimits
from app.breaker import Breaker
from app.errors import RateLimited, ServiceUnavailable
from app.observability import metrics
from app.ratelimit.limiter import (
    Limits,
    RateLimiter,
    RateLimiterCallFailed,
    RateLimiterError,
    RateLimiterUnavailable,
    Reservation,
)

log = logging.getLogger(__name__)

# What a request is assumed to cost before its usage is known: the prompt's bytes / 4 plus this many
# completion tokens (or the request's own max_tokens when it was read). Settled to the real usage later.
DEFAULT_COMPLETION_ESTIMATE = 256
BYTES_PER_TOKEN = 4


@dataclass
class Ticket:
    headers: dict[str, str] = field(default_factory=dict)
    reservation: Reservation | None = None
    renewer: Any = None  # the greenlet renewing the reservation's concurrency leases, if any


def estimate_tokens(body_bytes: int, max_tokens: object = None) -> int:
    """The tokens to reserve before usage is known: the body's bytes / 4 plus max_tokens (else 256).

    Only a positive int counts as a max_tokens; anything else (a bool, a float, a string, a negative: validation
    rejects those before) falls back to the default rather than failing. However large the result, the limiter
    reserves at most the tenant's token budget.
    """
    completion = DEFAULT_COMPLETION_ESTIMATE
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0:
        completion = max_tokens
    return max(0, body_bytes) // BYTES_PER_TOKEN + completion


def _gevent_patched() -> bool:
    from gevent import monkey

    return monkey.is_module_patched("socket")


class Admission:
    """One tenant's request against its limits, and the one place that decides what a limiter failure means.

    ``renew_leases``: renew admitted requests' concurrency leases in a greenlet; None (the default) does
    whenever gevent has patched the process (gunicorn's gevent worker), where such a greenlet runs.
    """

    def __init__(self, limiter: RateLimiter, *, fail_closed: bool, window_seconds: float = 60.0,
                 renew_leases: bool | None = None) -> None:
        self.limiter = limiter
        self.fail_closed = fail_closed
        self.window_seconds = window_seconds
        self.breaker = Breaker()
        self.renew_leases = _gevent_patched() if renew_leases is None else renew_leases

    def needs_model(self, tenant: Tenant) -> bool:
        """Per-model limits are the only reason to read the body before admitting."""
        return bool(tenant.model_limits)

    def admit(self, tenant: Tenant, *, request_id: str, estimated_tokens: int, model: str | None = None) -> Ticket:
        limits = self._limits(tenant.limits)
        model_limits = tenant.model_limits.get(model) if model is not None else None
        if not limits.enabled and (model_limits is None or not model_limits.any):
            return Ticket()
        now = time.time()
        if not self.breaker.available(now):
            return self._unavailable(None)
        try:
            decision = self.limiter.acquire(
                tenant.name, limits, estimated_tokens=estimated_tokens, model=model,
                model_limits=self._limits(model_limits) if model_limits is not None else None,
                request_id=_slot_id(request_id),
            )
        except RateLimiterUnavailable as exc:
            self.breaker.failed(now)
            return self._unavailable(exc)
        except RateLimiterCallFailed as exc:
            # Redis is up and answered; this call was wrong. Opening the breaker would drop every tenant's
            # limits over one bad request, so only this request fails (open or closed, as configured).
            log.error("rate-limit call failed for tenant %s, failing %s: %s", tenant.name,
                      "closed" if self.fail_closed else "open", exc, extra={"request_id": request_id})
            return self._unavailable(None)
        self.breaker.succeeded()
        if not decision.allowed:
            metrics.RATELIMITED.labels(decision.dimension or "requests").inc()
            raise RateLimited(
                f"Rate limit reached for {decision.dimension} (tenant {tenant.name}); retry after the indicated time.",
                headers=decision.headers,
            )
        ticket = Ticket(headers=decision.headers, reservation=decision.reservation)
        if self.renew_leases and decision.reservation is not None and decision.reservation.concurrency_keys:
            ticket.renewer = _spawn(self._renew, decision.reservation)
        return ticket

    def finish(self, ticket: Ticket, actual_tokens: int | None) -> None:
        """Settle tokens to the real usage (None: unknown, keep the reservation) and release the concurrency
        slot; a failure only logs."""
        if ticket.renewer is not None:
            ticket.renewer.kill(block=False)
            ticket.renewer = None
        if ticket.reservation is None:
            return
        try:
            self.limiter.finish(ticket.reservation, actual_tokens)
        except RateLimiterError as exc:
            metrics.REDIS_ERRORS.labels("ratelimit").inc()
            log.warning("rate-limit settlement lost (%s): %s", type(exc).__name__, exc)

    def _renew(self, reservation: Reservation) -> None:
        """Renew the leases every quarter lease until finish() kills this greenlet or the slots are gone.

        Three renewals can fail in a row (Redis restarting) before a slot is lost.
        """
        import gevent

        while True:
            gevent.sleep(self.limiter.lease_seconds / 4)
            try:
                if not self.limiter.renew(reservation):
                    return
            except RateLimiterError as exc:
                metrics.REDIS_ERRORS.labels("ratelimit").inc()
                log.warning("concurrency lease renewal failed (%s): %s", type(exc).__name__, exc)

    def _limits(self, limits: TenantLimits) -> Limits:
        return Limits(rpm=limits.rpm, tpm=limits.tpm, concurrency=limits.concurrency,
                      window_seconds=self.window_seconds)

    def _unavailable(self, exc: RateLimiterUnavailable | None) -> Ticket:
        metrics.REDIS_ERRORS.labels("ratelimit").inc()
        if exc is not None:
            log.warning("rate limiter unavailable (Redis), failing %s: %s",
                        "closed" if self.fail_closed else "open", type(exc.__cause__ or exc).__name__)
        if self.fail_closed:
            raise ServiceUnavailable("The rate limiter is unavailable; retry shortly.",
                                     code="rate_limiter_unavailable", headers={"Retry-After": "1"})
        return Ticket()


def _spawn(fn: Callable[..., None], *args: Any) -> Any:
    import gevent

    return gevent.spawn(fn, *args)


def _slot_id(request_id: str) -> str:
    """The request's member in the concurrency sets: its id plus 64 random bits.

    The request id may come from the client (X-Request-ID is kept), and a client sending one id on every
    request would otherwise hold one slot however many requests it runs at once.
    """
    return f"{request_id}:{random.getrandbits(64):016x}"
