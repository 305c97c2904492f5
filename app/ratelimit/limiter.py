"""Per-tenant rate limits in Redis (requests, tokens, concurrency), one EVALSHA each.

The algorithm (GCRA) lives in ``lua/acquire.lua``; this module builds keys, packs
arguments, and turns the script's answer into a :class:`Decision`: each dimension's state, which
admission (``admission.py``) turns into OpenAI's ``x-ratelimit-*`` headers.

Errors: :class:`RateLimiterUnavailable` when Redis cannot serve anyone right now (the
caller may stop asking for a moment); :class:`RateLimiterCallFailed` when Redis answered
this one call with an error (a script bug, an argument out of range, a key of the wrong
type), which says nothing about the next tenant's call.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from redis.commands.core import Script

from app.redis_client import BUDGET, DOWN, REDIS_FAILURES, redis_failure

__all__ = [
    "DEFAULT_BURST",
    "BudgetCharge",
    "BudgetState",
    "LEASE_SECONDS",
    "Decision",
    "DimensionState",
    "Limits",
    "RateLimiter",
    "RateLimiterCallFailed",
    "RateLimiterError",
    "RateLimiterUnavailable",
    "Reservation",
    "burst_units",
    "worker_owner",
]

Dimension = Literal["requests", "tokens", "concurrency", "budget"]

_MICROS = 1_000_000
# Kind codes shared with the Lua scripts.
_KINDS: dict[str, Dimension] = {"r": "requests", "t": "tokens", "c": "concurrency", "b": "budget"}
# Safe key fragments stay readable; anything else (braces would break the hash tag, long
# names bloat every key) becomes "~" + a digest.  "~" is outside the safe set, so the
# two forms never collide.
_SAFE_TENANT = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")
_SAFE_MODEL = re.compile(r"[A-Za-z0-9_.:/@-]{1,100}")
_SAFE_OWNER = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
_SAFE_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,32}")

# How long a concurrency slot outlives its last renewal.  No setting bounds how long a request may
# run (UPSTREAM_READ_TIMEOUT is the longest silence between bytes, not a total, so a stream can go on
# for as long as tokens keep coming), so no fixed lease could be "long enough": instead a running
# request renews its lease (Admission does, every quarter lease), and the lease only has to cover a
# few missed renewals.  A worker killed mid-request (SIGKILL, OOM, GRACEFUL_TIMEOUT ran out) has its
# slots released by the master as soon as it sees the worker exit (`reap`); the lease is what is left
# when that cannot happen (the whole pod killed, Redis unreachable then), so it is kept short.
LEASE_SECONDS = 15.0
# No lease may be longer than this (the Lua scripts cap theirs at the same year).
_MAX_LEASE_SECONDS = 365 * 86400

class RateLimiterError(Exception):
    """A limiter call did not decide; the caller decides: admit (fail open) or refuse."""


class RateLimiterUnavailable(RateLimiterError):
    """Redis could not be asked (down, slow, failing over): every call would fail for a while."""


class RateLimiterCallFailed(RateLimiterError):
    """Redis answered this call with an error (a script bug, a bad argument): Redis itself is fine."""


def _limiter_error(exc: Exception) -> RateLimiterError:
    """The limiter's error for a redis-py one: only errors that are about Redis count as Redis down."""
    if redis_failure(exc) in (DOWN, BUDGET):
        return RateLimiterUnavailable(f"rate limiter cannot reach Redis: {exc}")
    return RateLimiterCallFailed(f"Redis refused a rate-limit call: {exc}")


# The share of a limit an idle tenant may spend at once (RATE_LIMIT_BURST).  GCRA admits at most
# burst + limit units in any window, so 0.1 keeps every sliding window within 1.1 x the limit.
DEFAULT_BURST = 0.1


def worker_owner(pid: int | None = None) -> str:
    """The name a worker's concurrency slots carry (host and pid), so they can be released when it dies.

    The master knows a dead worker's pid (gunicorn's ``child_exit``); the host keeps pods apart.
    """
    return f"{socket.gethostname()}/{os.getpid() if pid is None else pid}"


def burst_units(limit: float, burst: float) -> int:
    """Units an idle tenant may spend at once: `burst` of the limit, at least 1 (one request must always fit)."""
    return max(1, math.floor(limit * burst + 1e-9))


@dataclass(frozen=True)
class Limits:
    """Limits of one tenant (or one tenant's model); 0 turns a dimension off.

    ``window_seconds`` is the span ``rpm``/``tpm`` count over: 60 in production,
    shorter in tests.  ``burst``: the share of ``rpm``/``tpm`` that may be spent at once
    (see ``DEFAULT_BURST``); 1.0 lets an idle tenant spend a whole window at once.
    """

    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0
    window_seconds: float = 60.0
    burst: float = DEFAULT_BURST

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Limits.{name} must be an integer >= 0, got {value!r}")
        if not self.window_seconds > 0 or math.isinf(self.window_seconds):
            raise ValueError(f"Limits.window_seconds must be > 0, got {self.window_seconds!r}")
        if not 0 < self.burst <= 1:
            raise ValueError(f"Limits.burst must be > 0 and <= 1, got {self.burst!r}")

    @property
    def enabled(self) -> bool:
        """True when at least one dimension is on."""
        return bool(self.rpm or self.tpm or self.concurrency)


@dataclass(frozen=True)
class BudgetCharge:
    """One budget window a request is charged to: its cap and what the request reserves, in nano-dollars.

    ``window_id`` names the window's counter (a new window is a new counter: the budget frees at its reset);
    ``ends_at`` is when the window resets (unix seconds).
    """

    window: str
    window_id: str
    limit: int
    ends_at: float
    reserve: int


@dataclass(frozen=True)
class Reservation:
    """What an admitted request holds, as plain data (safe to hand to a greenlet).

    ``token_keys``: (key, limit, window in microseconds) of each token dimension the
    estimate was reserved on; each holds ``min(reserved_tokens, limit)``.
    ``budget_keys``: the budget counters holding ``reserved_nanos`` (the request's worst-case cost).
    ``concurrency_keys``: the sets holding ``request_id``.  All empty when nothing is held.
    """

    request_id: str
    reserved_tokens: int = 0
    token_keys: tuple[tuple[str, int, int], ...] = ()
    concurrency_keys: tuple[str, ...] = ()
    reserved_nanos: int = 0
    budget_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class DimensionState:
    """One dimension's state after a decision, as reported by the script."""

    dimension: Dimension
    limit: int
    remaining: int
    reset_seconds: float


@dataclass(frozen=True)
class BudgetState:
    """One budget window after a decision, as reported by the script (nano-dollars; reset in seconds)."""

    window: str
    limit: int
    remaining: int
    reset_seconds: float


@dataclass(frozen=True)
class Decision:
    """Admit or refuse, how long to wait, and each limited dimension's state (for the headers either way)."""

    allowed: bool
    retry_after: float = 0.0
    dimension: Dimension | None = None
    states: tuple[DimensionState, ...] = ()
    reservation: Reservation | None = None
    budgets: tuple[BudgetState, ...] = ()


def tenant_tag(tenant: str) -> str:
    """The hash tag of every key of one tenant (`{tenant}`), so each call on them stays in one Redis Cluster slot."""
    return "{" + _key_part(tenant, _SAFE_TENANT) + "}"


def model_part(model: str) -> str:
    """A model name as a key fragment: readable when safe, else a bounded digest."""
    return _key_part(model, _SAFE_MODEL)


def _key_part(value: str, pattern: re.Pattern[str]) -> str:
    """Keep a readable name when it is safe in a key, else a bounded digest of it."""
    if pattern.fullmatch(value):
        return value
    return "~" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _load_script(name: str) -> str:
    return resources.files(__package__).joinpath("lua", name).read_text(encoding="utf-8")


class RateLimiter:
    """Atomic per-tenant limits: ``acquire`` is one EVALSHA, ``settle``/``release`` one.

    Works with ``redis.Redis`` and ``redis.cluster.RedisCluster``: every key of one call
    carries the tenant's hash tag (``gw:{tenant}:rpm``), so a call never spans slots.
    redis-py's ``Script`` runs EVALSHA and, on NOSCRIPT (restart, ``SCRIPT FLUSH``,
    failover), loads the script on that node and retries once.

    ``lease_seconds``: how long a concurrency slot lasts unless renewed with :meth:`renew` (see
    ``LEASE_SECONDS``).
    """

    def __init__(self, redis_client: Any, *, lease_seconds: float = LEASE_SECONDS, key_prefix: str = "gw") -> None:
        if not 0 < lease_seconds <= _MAX_LEASE_SECONDS:
            raise ValueError(f"lease_seconds must be > 0 and <= {_MAX_LEASE_SECONDS}, got {lease_seconds!r}")
        if not _SAFE_PREFIX.fullmatch(key_prefix):
            raise ValueError(f"key_prefix must match {_SAFE_PREFIX.pattern}, got {key_prefix!r}")
        self._redis = redis_client
        self.lease_seconds = lease_seconds
        self._lease_us = int(lease_seconds * _MICROS)
        self._prefix = key_prefix
        self._acquire: Script = redis_client.register_script(_load_script("acquire.lua"))
        self._finish: Script = redis_client.register_script(_load_script("finish.lua"))
        self._renew: Script = redis_client.register_script(_load_script("renew.lua"))

    def ensure_loaded(self) -> None:
        """SCRIPT LOAD now (on every cluster primary): no first-request penalty."""
        try:
            for script in (self._acquire, self._finish, self._renew):
                script.sha = self._redis.script_load(script.script)
        except REDIS_FAILURES as exc:
            # At start-up any failure only means "load on first use"; the caller carries on either way.
            raise RateLimiterUnavailable(f"cannot load rate-limit scripts: {exc}") from exc

    def keys_for(self, tenant: str, model: str | None = None) -> dict[str, str]:
        """A tenant's (or its model's) keys by dimension, for tests and admin tools."""
        base = f"{self._prefix}:{tenant_tag(tenant)}:"
        if model is not None:
            base += f"m:{model_part(model)}:"
        return {
            "requests": base + "rpm",
            "tokens": base + "tpm",
            "concurrency": base + "conc",
        }

    def budget_key(self, tenant: str, window_id: str) -> str:
        """The counter of a tenant's spend (nano-dollars, running requests' reservations included) in one window."""
        return f"{self._prefix}:{tenant_tag(tenant)}:usd:{window_id}"

    def acquire(
        self,
        tenant: str,
        limits: Limits,
        *,
        estimated_tokens: int = 0,
        model: str | None = None,
        model_limits: Limits | None = None,
        budgets: Sequence[BudgetCharge] = (),
        request_id: str,
    ) -> Decision:
        """Admit or refuse on all dimensions at once; a refusal consumes nothing.

        Token dimensions reserve ``max(estimated_tokens, 1)`` (never free, so a spent
        budget refuses), but never more than their own limit: the estimate is a guess
        (a ``max_tokens`` is a ceiling, often far above the real answer), so a request
        claiming more than a whole budget is not refused forever: it waits for a full
        bucket and takes all of it.  :meth:`settle` then charges the real usage, and
        usage beyond the budget becomes debt that delays the tenant's next requests.
        The clamp also keeps the script's arithmetic in range (a ``max_tokens`` of
        2**63 would overflow it).  No Redis call if all limits are 0 and no budget applies.

        ``budgets``: each window's counter must hold the request's worst-case cost on top of what it holds, within
        its cap; unlike the token limits a budget is not a rate, so a request that does not fit waits for the
        window's reset (reported as refused on ``budget``, however long the other dimensions would make it wait).
        """
        dims: list[tuple[str, str, int, int]] = []  # (kind, key, limit, window us)
        bursts: list[int] = []
        scopes: list[tuple[str | None, Limits]] = [(None, limits)]
        if model is not None and model_limits is not None:
            scopes.append((model, model_limits))
        for scope_model, scope_limits in scopes:
            keys = self.keys_for(tenant, scope_model)
            window_us = max(1, round(scope_limits.window_seconds * _MICROS))
            for kind, limit in (
                ("r", scope_limits.rpm),
                ("t", scope_limits.tpm),
                ("c", scope_limits.concurrency),
            ):
                if limit:
                    dims.append((kind, keys[_KINDS[kind]], limit, window_us))
                    bursts.append(burst_units(limit, scope_limits.burst))
        for charge in budgets:
            # For "b" the window slot is when the window ends (unix ms) and the burst slot the cost reserved.
            dims.append(("b", self.budget_key(tenant, charge.window_id), max(0, int(charge.limit)),
                         round(charge.ends_at * 1000)))
            bursts.append(max(0, int(charge.reserve)))
        if not dims:
            return Decision(allowed=True, reservation=Reservation(request_id=request_id))

        token_limits = [limit for kind, _key, limit, _window in dims if kind == "t"]
        # Each token key takes min(reserved, its limit) (the script clamps the same way).
        reserved = min(max(1, int(estimated_tokens)), max(token_limits)) if token_limits else 0
        args: list[str | int] = [request_id, self._lease_us, reserved]
        for (kind, _key, limit, window_us), burst in zip(dims, bursts, strict=True):
            args += [kind, limit, window_us, burst]
        try:
            reply = self._acquire(keys=[key for _kind, key, _limit, _window in dims], args=args)
        except REDIS_FAILURES as exc:
            raise _limiter_error(exc) from exc

        allowed, refused_index, retry_us = int(reply[0]), int(reply[1]), int(reply[2])
        states = tuple(
            DimensionState(
                _KINDS[kind],
                limit,
                int(reply[3 + 2 * i]),
                int(reply[4 + 2 * i]) / _MICROS,
            )
            for i, (kind, _key, limit, _window) in enumerate(dims)
        )
        spent = tuple(BudgetState(charge.window, s.limit, s.remaining, s.reset_seconds)
                      for charge, s in zip(budgets, states[len(dims) - len(budgets):], strict=True))
        if not allowed:
            retry_after = max(retry_us / _MICROS, 1e-6)
            return Decision(
                allowed=False,
                retry_after=retry_after,
                dimension=_KINDS[dims[refused_index - 1][0]],
                states=states,
                budgets=spent,
            )
        reservation = Reservation(
            request_id=request_id,
            reserved_tokens=reserved,
            token_keys=tuple((key, limit, window_us) for kind, key, limit, window_us in dims if kind == "t"),
            concurrency_keys=tuple(key for kind, key, _limit, _window in dims if kind == "c"),
            reserved_nanos=max(0, int(budgets[0].reserve)) if budgets else 0,
            budget_keys=tuple(key for kind, key, _limit, _window in dims if kind == "b"),
        )
        return Decision(allowed=True, states=states, reservation=reservation, budgets=spent)

    def settle(self, reservation: Reservation, actual_tokens: int, actual_nanos: int | None = None) -> None:
        """Correct the token (and budget) reservation to the real usage (once per reservation)."""
        self._run_finish(reservation, actual_tokens=actual_tokens, actual_nanos=actual_nanos, release=False)

    def release(self, reservation: Reservation) -> None:
        """Give the request's concurrency slots back; idempotent."""
        self._run_finish(reservation, actual_tokens=None, actual_nanos=None, release=True)

    def finish(self, reservation: Reservation, actual_tokens: int | None, actual_nanos: int | None = None) -> None:
        """:meth:`settle` and :meth:`release` in one round trip, when an answer ends.

        ``actual_tokens`` (``actual_nanos``) None (usage or cost unknown) keeps that reservation as it is.
        """
        self._run_finish(reservation, actual_tokens=actual_tokens, actual_nanos=actual_nanos, release=True)

    def settle_budget(self, key: str, delta: int) -> None:
        """Correct one budget counter by ``delta`` nano-dollars (the sum of several requests' corrections)."""
        if not delta:
            return
        try:
            self._finish(keys=[key], args=["", 0, 1, int(delta)])
        except REDIS_FAILURES as exc:
            raise _limiter_error(exc) from exc

    def renew(self, reservation: Reservation) -> bool:
        """Extend the request's concurrency leases by a whole lease; False once it holds none.

        A released (or already expired and reclaimed) slot is not brought back.
        """
        if not reservation.concurrency_keys:
            return False
        try:
            held = self._renew(keys=list(reservation.concurrency_keys), args=[reservation.request_id, self._lease_us])
        except REDIS_FAILURES as exc:
            raise _limiter_error(exc) from exc
        return int(held) > 0

    def index_slots(self, owner: str, keys: Sequence[str], ttl_seconds: int) -> None:
        """Note that the worker ``owner`` holds slots in these concurrency sets, so :meth:`reap` finds them.

        The note lasts ``ttl_seconds`` after the last one (it outlives the worker only when its whole pod dies).
        """
        index = self._owner_index(owner)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.sadd(index, *keys)
            pipe.expire(index, ttl_seconds)
            pipe.execute()
        except REDIS_FAILURES as exc:
            raise _limiter_error(exc) from exc

    def reap(self, owner: str) -> int:
        """Release every concurrency slot a dead worker still holds (its members start with ``owner/``).

        Returns how many were released. Safe to run for a live worker only if it holds nothing.
        """
        index = self._owner_index(owner)
        mark = f"{owner}/".encode()
        released = 0
        try:
            for key in self._redis.smembers(index):
                members = [m for m in self._redis.zrange(key, 0, -1) if m.startswith(mark)]
                if members:
                    released += int(self._redis.zrem(key, *members))
            self._redis.delete(index)
        except REDIS_FAILURES as exc:
            raise _limiter_error(exc) from exc
        return released

    def _owner_index(self, owner: str) -> str:
        return f"{self._prefix}:slots:{_key_part(owner, _SAFE_OWNER)}"

    def _run_finish(self, reservation: Reservation, *, actual_tokens: int | None, actual_nanos: int | None,
                    release: bool) -> None:
        # Per token key: actual - what that key holds (the reservation, clamped to its limit).
        corrections: list[tuple[str, int, int, int]] = []
        if actual_tokens is not None:
            actual = max(0, int(actual_tokens))
            for key, limit, window_us in reservation.token_keys:
                delta = actual - min(reservation.reserved_tokens, limit)
                if delta:
                    corrections.append((key, limit, window_us, delta))
        # Per budget counter: the real cost - the worst case it holds.
        cost_delta = 0 if actual_nanos is None else max(0, int(actual_nanos)) - reservation.reserved_nanos
        budget_keys = reservation.budget_keys if cost_delta else ()
        conc_keys = reservation.concurrency_keys if release else ()
        if not corrections and not budget_keys and not conc_keys:
            return
        args: list[str | int] = [reservation.request_id, len(corrections), len(budget_keys)]
        for _key, limit, window_us, delta in corrections:
            args += [limit, window_us, delta]
        args += [cost_delta] * len(budget_keys)
        try:
            self._finish(keys=[key for key, *_ in corrections] + list(budget_keys) + list(conc_keys), args=args)
        except REDIS_FAILURES as exc:
            raise _limiter_error(exc) from exc
