"""A circuit breaker with a half-open state: after a failure, skip the dependency for a pause, then let one
call through to find out whether it is back.

closed -> (a failure) -> open for `pause_seconds` -> half-open: the next caller is the probe, every other
caller still skips -> `close_after` probes in a row succeed: closed; one fails: open again. Without the
half-open step, every request waiting at the end of the pause would try a still-slow dependency at once, and
each pay its timeout. More than one probe matters for a dependency that is slow most of the time (Redis busy
with a long command, answering only in short gaps): one lucky answer in a gap must not let everyone in.
"""

from __future__ import annotations

from collections.abc import Callable


class Breaker:
    """Remembers that a dependency (Redis, the embedding API) just failed, so the requests of the next pause
    skip it instead of each waiting for it to fail again; then one probe call at a time finds out if it is back.

    Callers ask `available(now)` before a call and report `succeeded(started)` or `failed(now)` after it.
    A probe that never reports (its greenlet was killed, it hit an unrelated error) is given up on after
    `probe_timeout` seconds, and the next caller probes instead.

    `prober`: when given, probes are not callers' calls: `prober(breaker)` starts a probe of its own in the
    background (which reports back the same way) and the caller that found it due skips like the others, so
    no request waits on a dependency that may still be slow.
    """

    def __init__(self, pause_seconds: float = 1.0, *, probe_timeout: float | None = None,
                 close_after: int = 1, prober: Callable[[Breaker], None] | None = None) -> None:
        self.pause_seconds = pause_seconds
        self.probe_timeout = pause_seconds if probe_timeout is None else probe_timeout
        self.close_after = close_after
        self.prober = prober
        self._probes_ok = 0  # probes in a row that succeeded since the breaker last opened
        self._open_until = 0.0  # 0: closed
        self._failed_at = 0.0  # the last failure: only a call begun after it may close the breaker
        self._probe_until = 0.0  # a probe is out until then

    @property
    def closed(self) -> bool:
        return self._open_until == 0.0

    def available(self, now: float) -> bool:
        """Whether this caller may call: always when closed; after the pause, to one caller at a time (the probe).

        A True from an open breaker makes the caller the probe: it must report back.
        """
        if self._open_until == 0.0:
            return True
        if now < self._open_until or now < self._probe_until:
            return False
        self._probe_until = now + self.probe_timeout
        if self.prober is not None:
            self.prober(self)
            return False
        return True

    def failed(self, now: float) -> None:
        self._failed_at = now
        self._open_until = now + self.pause_seconds
        self._probe_until = 0.0
        self._probes_ok = 0

    def succeeded(self, started: float | None = None) -> None:
        """A call that began at `started` worked. It closes an open breaker only if it began after the last
        failure (the probe): a slow call that was already under way when others failed proves nothing."""
        if self._open_until == 0.0:
            return
        if started is not None and started < self._failed_at:
            return
        self._probe_until = 0.0  # the next caller may probe at once
        self._probes_ok += 1
        if self._probes_ok >= self.close_after:
            self._open_until = 0.0
            self._probes_ok = 0
