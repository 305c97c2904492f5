"""The worker's own limits while Redis is out: its share of each limit, the same GCRA and burst."""

from __future__ import annotations

from app.ratelimit.limiter import Limits
from app.ratelimit.local import LocalLimits


def admitted(local: LocalLimits, limits: Limits, times: list[float], tokens: int = 1) -> int:
    return sum(local.acquire("t", [(None, limits)], tokens, now).allowed for now in times)


def test_each_worker_admits_its_share_of_the_rpm() -> None:
    """RPM 600 over 2 workers: one worker admits about 300 a minute (plus its burst), not 600 and not unlimited."""
    local = LocalLimits(workers=2, burst=0.1)
    every_10ms = [i / 100 for i in range(6000)]  # 100 requests a second for a minute
    count = admitted(local, Limits(rpm=600, burst=0.1), every_10ms)
    assert 300 <= count <= 300 + 30


def test_an_idle_tenant_gets_only_the_burst_at_once() -> None:
    """A burst of 100 requests at one instant: the share's burst (10 % of 300) passes, the rest is refused."""
    local = LocalLimits(workers=2, burst=0.1)
    assert admitted(local, Limits(rpm=600, burst=0.1), [5.0] * 100) == 30


def test_a_refusal_says_how_long_to_wait() -> None:
    local = LocalLimits(workers=1, burst=0.1)
    limits = Limits(rpm=60, burst=0.1)  # one a second, burst 6
    for _ in range(6):
        assert local.acquire("t", [(None, limits)], 1, 10.0).allowed
    refused = local.acquire("t", [(None, limits)], 1, 10.0)
    assert not refused.allowed and refused.dimension == "requests" and 0.9 < refused.retry_after <= 1.0


def test_concurrency_share_is_held_until_finished() -> None:
    """Concurrency 4 over 2 workers: 2 at once here; a finished request gives its place back."""
    local = LocalLimits(workers=2, burst=0.1)
    limits = Limits(concurrency=4)
    first = local.acquire("t", [(None, limits)], 1, 0.0)
    second = local.acquire("t", [(None, limits)], 1, 0.0)
    assert first.allowed and second.allowed
    assert not local.acquire("t", [(None, limits)], 1, 0.0).allowed
    assert first.hold is not None
    local.finish(first.hold, None, 0.1)
    assert local.acquire("t", [(None, limits)], 1, 0.1).allowed


def test_tokens_are_settled_to_the_real_usage() -> None:
    """A reservation above the real usage is given back when the request ends."""
    local = LocalLimits(workers=1, burst=1.0)
    limits = Limits(tpm=1000, burst=1.0)
    big = local.acquire("t", [(None, limits)], 900, 0.0)
    assert big.allowed and not local.acquire("t", [(None, limits)], 200, 0.0).allowed
    assert big.hold is not None
    local.finish(big.hold, 100, 0.0)
    assert local.acquire("t", [(None, limits)], 200, 0.0).allowed


def test_a_refusal_on_one_scope_consumes_nothing_on_the_other() -> None:
    """Tenant and model limits decide together: refused by the model's, the tenant's credit is untouched."""
    local = LocalLimits(workers=1, burst=1.0)
    tenant, model = Limits(rpm=2, burst=1.0), Limits(rpm=1, burst=1.0)
    assert local.acquire("t", [(None, tenant), ("m", model)], 1, 0.0).allowed
    assert not local.acquire("t", [(None, tenant), ("m", model)], 1, 0.0).allowed
    assert local.acquire("t", [(None, tenant)], 1, 0.0).allowed
