"""Where the gateway's concurrency is decided: is gevent patching this process, and how work leaves the request.

Under gunicorn's gevent worker every request is a greenlet on one hub: work that only prepares the future (storing a
cache entry for the next request) must not hold the client's answer, and must never grow without bound. Outside
gevent (unit tests, tools) the same calls run inline, so the code paths stay the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def gevent_patched() -> bool:
    """True inside a gevent worker: sockets are cooperative and background greenlets run."""
    try:
        from gevent import monkey
    except ImportError:  # gevent is a runtime dependency; without it nothing can be patched
        return False
    return bool(monkey.is_module_patched("socket"))


class BackgroundQueue:
    """A bounded queue drained by one greenlet: offering never blocks, a full queue drops and counts.

    Jobs must be plain data (never the request context). ``on_drop`` is told each drop; the first drop and every
    100th are logged, so a sustained overload shows in the log without flooding it.
    """

    def __init__(self, name: str, handler: Callable[[Any], None], capacity: int,
                 on_drop: Callable[[], None] | None = None, background: bool | None = None) -> None:
        self.name = name
        self.capacity = capacity
        self.dropped = 0
        self._handler = handler
        self._on_drop = on_drop
        self.background = gevent_patched() if background is None else background
        self._queue: Any = None
        self._consumer: Any = None

    def offer(self, job: Any) -> bool:
        """Queue ``job`` (or run it now outside gevent); False, counted and logged, when the queue is full."""
        if not self.background:
            self._run(job)
            return True
        if self._queue is None:
            self._start()
        if self._queue.qsize() >= self.capacity:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("background queue %s full (%d jobs): %d dropped so far", self.name, self.capacity,
                            self.dropped)
            return False
        self._queue.put_nowait(job)
        return True

    def pending(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    def _start(self) -> None:
        import gevent
        from gevent.queue import Queue

        self._queue = Queue()
        self._consumer = gevent.spawn(self._drain)

    def _drain(self) -> None:
        while True:
            self._run(self._queue.get())

    def _run(self, job: Any) -> None:
        try:
            self._handler(job)
        except Exception:  # a failed background job must never end the consumer; it is only a lost cache write
            log.exception("background job of %s failed", self.name)
