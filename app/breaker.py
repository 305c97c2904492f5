"""A minimal circuit breaker: fail fast for a short pause after a dependency failed."""

from __future__ import annotations


class Breaker:
    """Remembers that a dependency (Redis, the embedding API) just failed, so the requests of the next pause
    skip it instead of each waiting for it to fail again.

    The first call after the pause goes through again: the cache and limiter come back by themselves.
    """

    def __init__(self, pause_seconds: float = 1.0) -> None:
        self.pause_seconds = pause_seconds
        self._open_until = 0.0

    def available(self, now: float) -> bool:
        return now >= self._open_until

    def failed(self, now: float) -> None:
        self._open_until = now + self.pause_seconds

    def succeeded(self) -> None:
        self._open_until = 0.0
