"""Where the gateway's concurrency is decided: is gevent patching this process, and how work leaves the request.

Under gunicorn's gevent worker every request is a greenlet on one hub: work that only prepares the future (storing a
cache entry for the next request) must not hold the client's answer, and must never grow without bound. Outside
gevent (unit tests, tools) the same calls run inline, so the code paths stay the same.

This is the only module of `app/` that imports gevent, and it does so inside the functions: importing it patches
nothing, and the gunicorn worker has patched the process before the app is loaded.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


_patched = False  # once patched, a process stays patched: only a True answer is kept


def gevent_patched() -> bool:
    """True inside a gevent worker: sockets are cooperative and background greenlets run.

    Asked on every request (timeouts, queues), so a True answer is remembered; False is asked again, as the
    gunicorn master loads modules before its workers are patched.
    """
    global _patched
    if _patched:
        return True
    try:
        from gevent import monkey
    except ImportError:  # gevent is a runtime dependency; without it nothing can be patched
        return False
    _patched = bool(monkey.is_module_patched("socket"))
    return _patched


def spawn(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in a greenlet of its own (gevent worker only); the greenlet, to join or kill.

    Pass plain data, never the request context: the greenlet outlives the request.
    """
    import gevent

    return gevent.spawn(fn, *args)


def sleep(seconds: float) -> None:
    """Yield to the other greenlets for ``seconds`` (a background greenlet's pause)."""
    import gevent

    gevent.sleep(seconds)


def offload(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the hub's thread pool, waited for without blocking the other greenlets (CPU work that
    releases the GIL, such as model inference). Only inside a gevent worker; elsewhere call ``fn`` itself."""
    import gevent

    return gevent.get_hub().threadpool.apply(fn, args)


def new_event() -> Any:
    """An event greenlets can wait on with a timeout (gevent's; only inside a gevent worker)."""
    from gevent.event import Event

    return Event()


def timeout(seconds: float, exception: BaseException | None = None) -> Any:
    """A gevent.Timeout when gevent has patched the sockets (the only place it can interrupt a call), else None."""
    if not gevent_patched():
        return None
    from gevent import Timeout

    return Timeout(seconds, exception)


def deadline(seconds: float) -> Any:
    """A gevent.Timeout to start around a wait that must end by then, raised into this greenlet when it passes
    (it interrupts urllib3's waits and backoffs under gevent); the caller tells it apart by identity."""
    from gevent import Timeout

    return Timeout(seconds)


def lifo_queue_class() -> type:
    """The LIFO queue a connection pool should wait on: gevent's when patched, so waiting greenlets yield."""
    if gevent_patched():
        from gevent.queue import LifoQueue

        return LifoQueue
    from queue import LifoQueue

    return LifoQueue


_poll: Any = None  # the standard library's own select.poll, looked up on first use


def readable_now(sock: Any) -> bool:
    """Whether ``sock`` has bytes, an EOF or an error waiting, answered by one poll syscall with a zero timeout.

    Connection pools (urllib3's, redis-py's) ask this before reusing an idle connection, through the patched
    ``select``: under gevent that sets up watchers and a timer and switches to the hub, about 90 us per check on
    this project's machine against a few for the unpatched poll, which cannot block with a zero timeout.
    """
    global _poll
    if _poll is None:
        from gevent import monkey

        _poll = monkey.get_original("select", "poll")
    poller = _poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class Drops:
    """Work given up because the buffer it waits in is full: counted, told to ``on_drop`` (a metric) and logged, the
    first time and every 100th, so a sustained overload shows in the log without flooding it.

    The one home of that rule for every bounded buffer of a worker (background queues, waiting L1 SETs, spend
    records), so an operator reading the log sees each of them the same way.
    """

    def __init__(self, what: str, bound: str, on_drop: Callable[[], None] | None = None) -> None:
        self.what, self.bound = what, bound  # as the log line names them: "<what> full (<bound>)"
        self.count = 0
        self._on_drop = on_drop

    def __call__(self) -> None:
        self.count += 1
        if self._on_drop is not None:
            self._on_drop()
        if self.count == 1 or self.count % 100 == 0:
            log.warning("%s full (%s): %d dropped so far", self.what, self.bound, self.count)


class BackgroundQueue:
    """A bounded queue drained by one greenlet: offering never blocks, a full queue drops and counts.

    Jobs must be plain data (never the request context). Drops are counted, told to ``on_drop`` and logged (`Drops`).
    """

    def __init__(self, name: str, handler: Callable[[Any], None], capacity: int,
                 on_drop: Callable[[], None] | None = None, background: bool | None = None) -> None:
        self.name = name
        self.capacity = capacity
        self._drops = Drops(f"background queue {name}", f"{capacity} jobs", on_drop)
        self._handler = handler
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
            self._drops()
            return False
        self._queue.put_nowait(job)
        return True

    @property
    def dropped(self) -> int:
        return self._drops.count

    def pending(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    def _start(self) -> None:
        from gevent.queue import Queue

        self._queue = Queue()
        self._consumer = spawn(self._drain)

    def _drain(self) -> None:
        while True:
            self._run(self._queue.get())

    def _run(self, job: Any) -> None:
        try:
            self._handler(job)
        except Exception:  # a failed background job must never end the consumer; it is only a lost cache write
            log.exception("background job of %s failed", self.name)
