"""Admission: a tenant's limits -> one limiter call, with the fail-open/closed decision made here only.

A refused request raises `RateLimited` carrying OpenAI's headers and `Retry-After`; an admitted one gets a
`Ticket` that is finished when the answer ends (real token usage settled, concurrency slot released).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from app.auth import Tenant, TenantLimits
from app.breaker import Breaker
from app.errors import RateLimited, ServiceUnavailable
from app.observability import metrics
from app.ratelimit.limiter import Limits, RateLimiter, RateLimiterUnavailable, Reservation

log = logging.getLogger(__name__)

# What a request is assumed to cost before its usage is known: the prompt's bytes / 4 plus this many
# completion tokens (or the request's own max_tokens when it was read). Settled to the real usage later.
DEFAULT_COMPLETION_ESTIMATE = 256
BYTES_PER_TOKEN = 4


@dataclass
class Ticket:
    headers: dict[str, str] = field(default_factory=dict)
    reservation: Reservation | None = None


def estimate_tokens(body_bytes: int, max_tokens: int | None = None) -> int:
    return body_bytes // BYTES_PER_TOKEN + (max_tokens or DEFAULT_COMPLETION_ESTIMATE)


class Admission:
    def __init__(self, limiter: RateLimiter, *, fail_closed: bool, window_seconds: float = 60.0) -> None:
        self.limiter = limiter
        self.fail_closed = fail_closed
        self.window_seconds = window_seconds
        self.breaker = Breaker()

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
                request_id=request_id,
            )
        except RateLimiterUnavailable as exc:
            self.breaker.failed(now)
            return self._unavailable(exc)
        self.breaker.succeeded()
        if not decision.allowed:
            metrics.RATELIMITED.labels(decision.dimension or "requests").inc()
            raise RateLimited(
                f"Rate limit reached for {decision.dimension} (tenant {tenant.name}); retry after the indicated time.",
                headers=decision.headers,
            )
        return Ticket(headers=decision.headers, reservation=decision.reservation)

    def finish(self, ticket: Ticket, actual_tokens: int) -> None:
        """Settle tokens to the real usage and release the concurrency slot; a failure only logs."""
        if ticket.reservation is None:
            return
        try:
            self.limiter.finish(ticket.reservation, actual_tokens)
        except RateLimiterUnavailable as exc:
            metrics.REDIS_ERRORS.labels("ratelimit").inc()
            log.warning("rate-limit settlement lost (Redis unavailable): %s", type(exc.__cause__).__name__)

    def _limits(self, limits: TenantLimits) -> Limits:
        return Limits(rpm=limits.rpm, tpm=limits.tpm, concurrency=limits.concurrency,
                      window_seconds=self.window_seconds)

    def _unavailable(self, exc: Exception | None) -> Ticket:
        metrics.REDIS_ERRORS.labels("ratelimit").inc()
        if exc is not None:
            log.warning("rate limiter unavailable (Redis), failing %s: %s",
                        "closed" if self.fail_closed else "open", type(exc.__cause__ or exc).__name__)
        if self.fail_closed:
            raise ServiceUnavailable("The rate limiter is unavailable; retry shortly.",
                                     code="rate_limiter_unavailable", headers={"Retry-After": "1"})
        return Ticket()
