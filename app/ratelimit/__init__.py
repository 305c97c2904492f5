"""Per-tenant rate limits (requests, tokens, concurrency) in Redis; see limiter.py."""

from app.ratelimit.limiter import (
    Decision,
    DimensionState,
    Limits,
    RateLimiter,
    RateLimiterCallFailed,
    RateLimiterError,
    RateLimiterUnavailable,
    Reservation,
)

__all__ = [
    "Decision",
    "DimensionState",
    "Limits",
    "RateLimiter",
    "RateLimiterCallFailed",
    "RateLimiterError",
    "RateLimiterUnavailable",
    "Reservation",
]
