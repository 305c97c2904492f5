"""The bounded background queue: offering never waits, a full queue drops, counts and says so."""

from __future__ import annotations

import logging
import time

import gevent
import gevent.event
import pytest

from app.concurrency import BackgroundQueue, Drops


def test_a_full_queue_drops_counts_and_logs_without_waiting(caplog: pytest.LogCaptureFixture) -> None:
    done: list[int] = []
    release = gevent.event.Event()

    def handler(job: int) -> None:
        release.wait()
        done.append(job)

    drops: list[int] = []
    queue = BackgroundQueue("test", handler, capacity=5, on_drop=lambda: drops.append(1), background=True)
    with caplog.at_level(logging.WARNING, logger="app.concurrency"):
        started = time.perf_counter()
        accepted = [queue.offer(i) for i in range(5)]
        gevent.sleep(0)  # the consumer takes job 0 and blocks in it: one more place frees up
        accepted += [queue.offer(i) for i in range(5, 15)]
        elapsed = time.perf_counter() - started
    assert accepted.count(True) == 6 and accepted.count(False) == 9
    assert queue.dropped == 9 and len(drops) == 9
    assert elapsed < 0.5  # nothing waited for the blocked consumer
    assert any("background queue test full" in r.getMessage() for r in caplog.records)
    release.set()
    gevent.sleep(0.05)
    assert sorted(done) == [0, 1, 2, 3, 4, 5]
    assert queue.pending() == 0


def test_a_failing_job_does_not_stop_the_consumer(caplog: pytest.LogCaptureFixture) -> None:
    done: list[int] = []

    def handler(job: int) -> None:
        if job == 1:
            raise RuntimeError("boom")
        done.append(job)

    queue = BackgroundQueue("test", handler, capacity=10, background=True)
    with caplog.at_level(logging.ERROR, logger="app.concurrency"):
        for i in range(3):
            queue.offer(i)
        gevent.sleep(0.05)
    assert done == [0, 2]
    assert any("failed" in r.getMessage() for r in caplog.records)


def test_outside_gevent_jobs_run_inline() -> None:
    done: list[int] = []
    queue = BackgroundQueue("test", done.append, capacity=1, background=False)
    assert queue.offer(1) and queue.offer(2)
    assert done == [1, 2]


def test_drops_are_counted_reported_and_logged_first_and_every_hundredth(caplog: pytest.LogCaptureFixture) -> None:
    """Every bounded buffer of a worker reports a drop the same way: the metric each time, the log line at the
    first and every 100th, so an overload shows without flooding the log."""
    told: list[int] = []
    drops = Drops("L1 stores waiting for Redis", "3 SETs", lambda: told.append(1))
    with caplog.at_level(logging.WARNING, logger="app.concurrency"):
        for _ in range(250):
            drops()
    assert drops.count == 250 and len(told) == 250
    assert [r.getMessage() for r in caplog.records] == [
        f"L1 stores waiting for Redis full (3 SETs): {n} dropped so far" for n in (1, 100, 200)]
