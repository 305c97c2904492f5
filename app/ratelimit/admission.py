"""Admission: a tenant's limits -> one limiter call, with the fail-open/closed decision made here only.

A refused request raises `RateLimited` carrying OpenAI's headers and `Retry-After`; an admitted one gets a
`Ticket` that is finished when the answer ends (real token usage settled, concurrency slot released). While it
runs, a greenlet renews its concurrency leases, so a stream of any length keeps its slot.

When the limiter cannot decide, the request is refused with a 503 (fail closed) or judged by this worker alone
(fail open): `LocalLimits` admits the worker's share of each limit (limit / WEB_CONCURRENCY), so an outage
loosens the limits instead of lifting them. Only Redis being down or slow opens the breaker (the next second's
requests skip Redis, then one probe finds out whether it is back); an error answer to one call (a script bug,
an argument out of range) fails that request alone. Every Redis call of a request, the settlement at its end
included, runs within the request's `RedisBudget` and behind the same breaker; a settlement Redis could not
take is owed and paid by a background greenlet once Redis answers again.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.auth import Tenant, TenantLimits
from app.breaker import Breaker
from app.concurrency import gevent_patched, sleep, spawn
from app.errors import BudgetExceeded, GatewayError, RateLimited, ServiceUnavailable, TokensRateLimited, retry_after
from app.observability import metrics
from app.ratelimit.limiter import (
    DEFAULT_BURST,
    BudgetCharge,
    BudgetState,
    Decision,
    DimensionState,
    Limits,
    RateLimiter,
    RateLimiterCallFailed,
    RateLimiterUnavailable,
    Reservation,
    worker_owner,
)
from app.ratelimit.local import LocalHold, LocalLimits
from app.redis_client import REDIS_FAILURES, RedisBudget, bounded, opens_breaker
from app.spend.budget import usd_text, windows
from app.spend.prices import Usage

log = logging.getLogger(__name__)

# What a request is assumed to cost before its usage is known: the prompt's bytes / 4 plus this many
# completion tokens (or the request's own max_tokens when it was read). Settled to the real usage later.
DEFAULT_COMPLETION_ESTIMATE = 256
BYTES_PER_TOKEN = 4
# Settlements owed to Redis while it could not be asked; beyond this many the oldest are dropped (their slots
# then wait for their lease, their token estimates stand).
OWED_MAX = 10_000
# How long the note of which concurrency sets a worker holds slots in lasts, and how often it is renewed.
SLOT_INDEX_TTL = 7200
SLOT_INDEX_REFRESH = 3600
# How often a worker settles the budget corrections of requests that held nothing else (one call per counter, for
# all the requests of the period). Until then a counter holds their worst cases: a budget briefly stricter, never
# looser. At 0.05 s a tenant sending one request at a time paid one more Redis call per request (about 1 ms of CPU
# at c=1, side by side); at 0.2 s it is one per several requests.
BUDGET_SETTLE_SECONDS = 0.2


@dataclass
class Ticket:
    headers: dict[str, str] = field(default_factory=dict)
    reservation: Reservation | None = None
    renewer: Any = None  # the greenlet renewing the reservation's concurrency leases, if any
    local: LocalHold | None = None  # what the worker's own limits hold, when Redis could not be asked
    budget: RedisBudget | None = None  # the request's Redis time, which the settlement at its end shares


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


def worst_case_usage(body_bytes: int, body: dict[str, Any]) -> Usage:
    """The most a request can cost, for a budget's reservation: the body's bytes / 4 as prompt tokens (none from
    the provider's prompt cache), and `max_completion_tokens` (else `max_tokens`, else 256) per choice (`n`).

    Without a max the completion is a guess like the token limits' (settled to the real cost when the answer ends).
    """
    completion = DEFAULT_COMPLETION_ESTIMATE
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            completion = value
            break
    n = body.get("n")
    choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    return Usage(input=max(0, body_bytes) // BYTES_PER_TOKEN, cached=0, output=completion * choices)


class Admission:
    """One tenant's request against its limits, and the one place that decides what a limiter failure means.

    ``renew_leases``: run the background work in greenlets (renewing admitted requests' concurrency leases,
    paying owed settlements); None (the default) does whenever gevent has patched the process (gunicorn's
    gevent worker), where such greenlets run. ``workers``: how many workers share the limits (the local
    share while Redis is out is limit / workers). ``owner``: the name this worker's slots carry
    (`worker_owner()`), for the master to release them if the worker dies.
    """

    def __init__(self, limiter: RateLimiter, *, fail_closed: bool, window_seconds: float = 60.0,
                 burst: float = DEFAULT_BURST, workers: int = 1, renew_leases: bool | None = None,
                 owner: str | None = None, breaker: Breaker | None = None,
                 budget_window_seconds: float | None = None) -> None:
        self.limiter = limiter
        self.budget_window_seconds = budget_window_seconds  # tests only: short budget windows
        self.fail_closed = fail_closed
        self.window_seconds = window_seconds
        self.burst = burst
        self.breaker = breaker or Breaker()  # the worker's Redis breaker, shared with the cache
        self.local = LocalLimits(workers=workers, burst=burst)
        self.renew_leases = gevent_patched() if renew_leases is None else renew_leases
        self.owner = worker_owner() if owner is None else owner
        self._indexed: dict[str, float] = {}  # concurrency set -> when this worker last noted holding slots there
        self._owed: deque[tuple[Reservation, int | None, int | None]] = deque(maxlen=OWED_MAX)
        self._payer: Any = None
        self._budget_deltas: dict[str, int] = {}  # budget counter -> corrections not yet settled
        self._budget_payer: Any = None

    def needs_model(self, tenant: Tenant) -> bool:
        """Per-model limits and a budget (priced per model) are the only reasons to read the body before admitting."""
        return bool(tenant.model_limits) or tenant.budget is not None

    def admit(self, tenant: Tenant, *, request_id: str, estimated_tokens: int, model: str | None = None,
              budget: RedisBudget | None = None, worst_case_nanos: int = 0) -> Ticket:
        """``worst_case_nanos``: the most the request can cost, reserved on the tenant's budget windows (if any)."""
        limits = self._limits(tenant.limits)
        model_limits = tenant.model_limits.get(model) if model is not None else None
        scoped = self._limits(model_limits) if model_limits is not None else None
        started = time.time()
        charges = self._charges(tenant, worst_case_nanos, started)
        if not limits.enabled and (scoped is None or not scoped.enabled) and not charges:
            return Ticket()
        scopes = [(None, limits)] + ([(model, scoped)] if scoped is not None else [])
        if (budget is not None and budget.spent) or not self.breaker.available(started):
            return self._unavailable(tenant, scopes, estimated_tokens, None)
        try:
            with bounded(budget):
                decision = self.limiter.acquire(
                    tenant.name, limits, estimated_tokens=estimated_tokens, model=model, model_limits=scoped,
                    budgets=charges, request_id=f"{self.owner}/{_slot_id(request_id)}",
                )
        except (RateLimiterUnavailable, *REDIS_FAILURES) as exc:
            if opens_breaker(exc):
                self.breaker.failed(time.time())
            return self._unavailable(tenant, scopes, estimated_tokens, exc)
        except RateLimiterCallFailed as exc:
            # Redis is up and answered; this call was wrong. Opening the breaker would drop every tenant's
            # limits over one bad request, so only this request fails (open or closed, as configured).
            self.breaker.succeeded(started)
            log.error("rate-limit call failed for tenant %s, failing %s: %s", tenant.name,
                      "closed" if self.fail_closed else "open", exc, extra={"request_id": request_id})
            return self._unavailable(tenant, scopes, estimated_tokens, None)
        self.breaker.succeeded(started)
        if decision.reservation is not None and decision.reservation.concurrency_keys:
            self._index(decision.reservation.concurrency_keys, started, budget)
        if not decision.allowed:
            raise _refused(tenant, decision, decision_headers)
        ticket = Ticket(headers=decision_headers(decision), reservation=decision.reservation, budget=budget)
        if self.renew_leases and decision.reservation is not None and decision.reservation.concurrency_keys:
            ticket.renewer = spawn(self._renew, decision.reservation)
        return ticket

    def finish(self, ticket: Ticket, actual_tokens: int | None, actual_nanos: int | None = None) -> None:
        """Settle tokens and the budget to the real usage and cost (None: unknown, keep the reservation) and
        release the concurrency slot, within the request's Redis budget; what Redis cannot take now is owed."""
        if ticket.renewer is not None:
            ticket.renewer.kill(block=False)
            ticket.renewer = None
        if ticket.local is not None:
            self.local.finish(ticket.local, actual_tokens, time.time())
            ticket.local = None
        reservation, ticket.reservation = ticket.reservation, None
        if reservation is None:
            return
        if self.renew_leases and not reservation.token_keys and not reservation.concurrency_keys:
            # Nothing but money to settle (a budget with no token or concurrency limit): added up per counter and
            # settled from the background, rather than a round trip of this request's own.
            self._settle_later(reservation, actual_nanos)
            return
        started = time.time()
        budget = ticket.budget
        if (budget is not None and budget.spent) or not self.breaker.available(started):
            self._owe(reservation, actual_tokens, actual_nanos)
            return
        try:
            with bounded(budget):
                self.limiter.finish(reservation, actual_tokens, actual_nanos)
        except (RateLimiterUnavailable, *REDIS_FAILURES) as exc:
            metrics.REDIS_ERRORS.labels("ratelimit").inc()
            if opens_breaker(exc):
                self.breaker.failed(time.time())
                log.warning("rate-limit settlement deferred (%s)", type(exc.__cause__ or exc).__name__)
            self._owe(reservation, actual_tokens, actual_nanos)
            return
        except RateLimiterCallFailed as exc:
            metrics.REDIS_ERRORS.labels("ratelimit").inc()
            log.warning("rate-limit settlement lost: %s", exc)
        self.breaker.succeeded(started)

    def owed(self) -> int:
        """Settlements waiting for Redis (for tests and stats)."""
        return len(self._owed) + len(self._budget_deltas)

    def _settle_later(self, reservation: Reservation, actual_nanos: int | None) -> None:
        if not reservation.budget_keys or actual_nanos is None or actual_nanos == reservation.reserved_nanos:
            return  # nothing held (a requests-only limit), or the cost unknown: the worst case stays charged
        delta = max(0, actual_nanos) - reservation.reserved_nanos
        for key in reservation.budget_keys:
            self._budget_deltas[key] = self._budget_deltas.get(key, 0) + delta
        if self._budget_payer is None:
            self._budget_payer = spawn(self._settle_budgets)

    def _settle_budgets(self) -> None:
        """Every BUDGET_SETTLE_SECONDS, one call per budget counter with the sum of its corrections since the last;
        while Redis is out they wait (the counters keep the worst cases meanwhile: a stricter budget, never looser)."""
        try:
            while self._budget_deltas:
                sleep(BUDGET_SETTLE_SECONDS)
                started = time.time()
                if not self.breaker.available(started):
                    continue
                batch, self._budget_deltas = self._budget_deltas, {}
                pending = list(batch.items())
                while pending:
                    key, delta = pending[0]
                    try:
                        self.limiter.settle_budget(key, delta)
                    except RateLimiterUnavailable:
                        self.breaker.failed(time.time())
                        for key, delta in pending:
                            self._budget_deltas[key] = self._budget_deltas.get(key, 0) + delta
                        break
                    except RateLimiterCallFailed as exc:
                        log.warning("budget settlement lost: %s", exc)
                    pending.pop(0)
                else:
                    self.breaker.succeeded(started)
        finally:
            self._budget_payer = None

    def _owe(self, reservation: Reservation, actual_tokens: int | None, actual_nanos: int | None) -> None:
        self._owed.append((reservation, actual_tokens, actual_nanos))
        if self.renew_leases and self._payer is None:
            self._payer = spawn(self._pay_owed)

    def _pay_owed(self) -> None:
        """Pay owed settlements once the breaker lets a call through; stop at the first sign Redis is still out."""
        try:
            while self._owed:
                sleep(self.breaker.pause_seconds / 4)
                started = time.time()
                if not self.breaker.available(started):
                    continue
                while self._owed:
                    reservation, actual_tokens, actual_nanos = self._owed[0]
                    try:
                        self.limiter.finish(reservation, actual_tokens, actual_nanos)
                    except RateLimiterUnavailable:
                        self.breaker.failed(time.time())
                        break
                    except RateLimiterCallFailed as exc:
                        log.warning("owed rate-limit settlement lost: %s", exc)
                    self.breaker.succeeded(started)
                    self._owed.popleft()
        finally:
            self._payer = None

    def _index(self, keys: tuple[str, ...], now: float, budget: RedisBudget | None) -> None:
        """Note (once an hour per set) which concurrency sets this worker holds slots in, for `reap`.

        A failure only leaves a crashed worker's slots to their lease; it does not fail the admitted request.
        """
        new = [key for key in keys if now - self._indexed.get(key, 0.0) >= SLOT_INDEX_REFRESH]
        if not new or (budget is not None and budget.spent):
            return
        try:
            with bounded(budget):
                self.limiter.index_slots(self.owner, new, SLOT_INDEX_TTL)
        except (RateLimiterUnavailable, *REDIS_FAILURES) as exc:
            if opens_breaker(exc):
                self.breaker.failed(time.time())
            log.warning("concurrency slots not indexed for release on a crash: %s", type(exc.__cause__ or exc).__name__)
            return
        except RateLimiterCallFailed as exc:
            log.warning("concurrency slots not indexed for release on a crash: %s", exc)
            return
        for key in new:
            self._indexed[key] = now

    def _renew(self, reservation: Reservation) -> None:
        """Renew the leases every quarter lease until finish() kills this greenlet or the slots are gone.

        Three renewals can fail (or be skipped while the breaker is open) in a row before a slot is lost.
        """
        while True:
            sleep(self.limiter.lease_seconds / 4)
            started = time.time()
            if not self.breaker.available(started):
                continue
            try:
                held = self.limiter.renew(reservation)
            except RateLimiterUnavailable as exc:
                self.breaker.failed(time.time())
                metrics.REDIS_ERRORS.labels("ratelimit").inc()
                log.warning("concurrency lease renewal failed (%s): %s", type(exc).__name__, exc)
                continue
            except RateLimiterCallFailed as exc:
                metrics.REDIS_ERRORS.labels("ratelimit").inc()
                log.warning("concurrency lease renewal failed (%s): %s", type(exc).__name__, exc)
                continue
            self.breaker.succeeded(started)
            if not held:
                return

    def _charges(self, tenant: Tenant, worst_case_nanos: int, now: float) -> list[BudgetCharge]:
        """The tenant's capped budget windows, each to reserve the request's worst case on (none: no budget)."""
        if tenant.budget is None:
            return []
        current = windows(now, self.budget_window_seconds)
        return [BudgetCharge(window, current[window].id, cap, current[window].ends_at, worst_case_nanos)
                for window, cap in tenant.budget.caps()]

    def _limits(self, limits: TenantLimits) -> Limits:
        return Limits(rpm=limits.rpm, tpm=limits.tpm, concurrency=limits.concurrency,
                      window_seconds=self.window_seconds, burst=self.burst)

    def _unavailable(self, tenant: Tenant, scopes: list[tuple[str | None, Limits]], estimated_tokens: int,
                     exc: BaseException | None) -> Ticket:
        metrics.REDIS_ERRORS.labels("ratelimit").inc()
        if exc is not None:
            log.warning("rate limiter unavailable (Redis), failing %s: %s",
                        "closed" if self.fail_closed else "open (this worker's share of the limits)",
                        type(exc.__cause__ or exc).__name__)
        if self.fail_closed:
            raise ServiceUnavailable("The rate limiter is unavailable; retry shortly.",
                                     code="rate_limiter_unavailable", headers={"Retry-After": "1"})
        decision = self.local.acquire(tenant.name, scopes, estimated_tokens, time.time())
        if not decision.allowed:
            raise _refused(tenant, decision, lambda local: rate_limit_headers([], local.retry_after))
        return Ticket(local=decision.hold)


def _refused(tenant: Tenant, decision: Any, headers: Callable[[Any], dict[str, str]]) -> GatewayError:
    """A refusal, counted: a budget's own 429 (`insufficient_quota`), else the rate limit's with `headers(decision)`."""
    metrics.RATELIMITED.labels(decision.dimension or "requests").inc()
    if decision.dimension == "budget":
        return _budget_exceeded(tenant, decision)
    refusal = TokensRateLimited if decision.dimension == "tokens" else RateLimited
    return refusal(
        f"Rate limit reached for {decision.dimension} (tenant {tenant.name}); retry after the indicated time.",
        headers=headers(decision),
    )


def _budget_exceeded(tenant: Tenant, decision: Decision) -> BudgetExceeded:
    """429 insufficient_quota: which window, its cap, what is left and when it resets; not worth retrying soon."""
    # The refused window is the one whose reset the script reported as the wait.
    state = min(decision.budgets, key=lambda s: abs(s.reset_seconds - decision.retry_after))
    return BudgetExceeded(
        f"Budget exceeded: tenant {tenant.name} may spend USD {usd_text(state.limit)} per {state.window}, and "
        f"USD {usd_text(max(0, state.remaining))} is left, less than this request may cost. The budget resets "
        f"in {round(state.reset_seconds)} s.",
        headers={**decision_headers(decision), "x-should-retry": "false"},
    )



def format_duration(seconds: float) -> str:
    """Format seconds like OpenAI's ``x-ratelimit-reset-*``: ``20ms``, ``1s``, ``6m0s``.

    Go's ``time.Duration`` form at millisecond precision, rounded up so a client never
    retries early.
    """
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, frac = divmod(rest, 1000)
    text = f"{secs}.{frac:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def decision_headers(decision: Decision) -> dict[str, str]:
    """The headers a limiter decision sends: the limits' and budgets' state, and `Retry-After` on a refusal."""
    return {**rate_limit_headers(decision.states, None if decision.allowed else decision.retry_after),
            **budget_headers(decision.budgets)}


def budget_headers(states: Sequence[BudgetState]) -> dict[str, str]:
    """`x-budget-limit-usd-<window>`, `x-budget-remaining-usd-<window>`, `x-budget-reset-<window>` per capped window.

    Remaining counts the worst case of requests still running as spent. The reset is OpenAI's duration form.
    """
    headers: dict[str, str] = {}
    for state in states:
        headers[f"x-budget-limit-usd-{state.window}"] = usd_text(state.limit)
        headers[f"x-budget-remaining-usd-{state.window}"] = usd_text(max(0, state.remaining))
        headers[f"x-budget-reset-{state.window}"] = format_duration(state.reset_seconds)
    return headers


def rate_limit_headers(states: Sequence[DimensionState], wait: float | None = None) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers, plus ``Retry-After`` when refused.

    When a tenant and a model limit both count requests (or tokens), the tighter one
    (fewest remaining) is reported.  Concurrency has no OpenAI header.  ``Retry-After``
    is whole seconds, at least 1 (``wait`` None means admitted: no header).
    """
    headers: dict[str, str] = {}
    for dimension in ("requests", "tokens"):
        candidates = [s for s in states if s.dimension == dimension]
        if not candidates:
            continue
        tightest = min(candidates, key=lambda s: (s.remaining, -s.reset_seconds))
        headers[f"x-ratelimit-limit-{dimension}"] = str(tightest.limit)
        headers[f"x-ratelimit-remaining-{dimension}"] = str(tightest.remaining)
        headers[f"x-ratelimit-reset-{dimension}"] = format_duration(tightest.reset_seconds)
    if wait is not None:
        headers["Retry-After"] = retry_after(wait)
    return headers


def _slot_id(request_id: str) -> str:
    """The request's member in the concurrency sets: its id plus 64 random bits.

    The request id may come from the client (X-Request-ID is kept), and a client sending one id on every
    request would otherwise hold one slot however many requests it runs at once.
    """
    return f"{request_id}:{random.getrandbits(64):016x}"
