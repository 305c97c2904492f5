"""The half-open breaker: one probe after the pause, stale successes ignored, a lost probe replaced."""

from __future__ import annotations

from app.breaker import Breaker


def test_after_the_pause_only_one_caller_probes() -> None:
    """When the pause ends, one caller goes through; the others keep skipping until it reports."""
    breaker = Breaker(pause_seconds=1.0)
    breaker.failed(100.0)
    assert not breaker.available(100.5)
    assert breaker.available(101.0)  # the probe
    assert [breaker.available(101.0 + i / 100) for i in range(1, 50)] == [False] * 49


def test_a_probe_that_succeeds_closes_the_breaker() -> None:
    """The probe's success lets everyone through again."""
    breaker = Breaker(pause_seconds=1.0)
    breaker.failed(100.0)
    assert breaker.available(101.0)
    breaker.succeeded(101.0)
    assert breaker.closed
    assert all(breaker.available(101.1) for _ in range(10))


def test_a_probe_that_fails_opens_it_for_another_pause() -> None:
    """A failed probe: skipped again for a whole pause, then one new probe."""
    breaker = Breaker(pause_seconds=1.0)
    breaker.failed(100.0)
    assert breaker.available(101.0)
    breaker.failed(101.2)
    assert not breaker.available(102.0)
    assert breaker.available(102.2)
    assert not breaker.available(102.3)


def test_a_success_begun_before_the_failure_does_not_close_it() -> None:
    """A slow call already under way when Redis failed for others proves nothing: the breaker stays open."""
    breaker = Breaker(pause_seconds=1.0)
    breaker.failed(100.0)
    breaker.succeeded(started=99.8)
    assert not breaker.closed
    assert not breaker.available(100.5)


def test_a_probe_that_never_reports_is_replaced() -> None:
    """A probe whose caller vanished does not keep the breaker open for ever: the next caller probes."""
    breaker = Breaker(pause_seconds=1.0, probe_timeout=0.5)
    breaker.failed(100.0)
    assert breaker.available(101.0)
    assert not breaker.available(101.4)
    assert breaker.available(101.5)


def test_one_lucky_answer_does_not_close_a_breaker_that_wants_several() -> None:
    """A dependency answering only in short gaps: one good probe lets the next probe in, not everyone."""
    breaker = Breaker(pause_seconds=1.0, close_after=3)
    breaker.failed(100.0)
    assert breaker.available(101.0)
    breaker.succeeded(101.0)
    assert not breaker.closed
    assert breaker.available(101.01)  # the second probe, at once
    assert not breaker.available(101.01)  # still one at a time
    breaker.failed(101.5)  # slow again
    assert not breaker.available(102.0)
    for t in (102.5, 102.51, 102.52):
        assert breaker.available(t)
        breaker.succeeded(t)
    assert breaker.closed


def test_with_a_prober_no_caller_is_the_probe() -> None:
    """A breaker with a prober starts its own probe when one is due; every caller keeps skipping meanwhile."""
    started: list[Breaker] = []
    breaker = Breaker(pause_seconds=1.0, close_after=2, prober=started.append)
    breaker.failed(100.0)
    assert not breaker.available(101.0)
    assert started == [breaker]
    assert not breaker.available(101.1)
    assert len(started) == 1  # one probe at a time
    breaker.succeeded(101.0)  # the probe reports back
    assert not breaker.available(101.2)
    assert len(started) == 2  # the second of the two probes, at once
    breaker.succeeded(101.2)
    assert breaker.available(101.3)
