"""One Redis time budget per request: time spent in calls adds up, and a spent budget refuses the next call."""

from __future__ import annotations

import pytest
import redis

import app.redis_client
from app.redis_client import BUDGET, CALL, DOWN, BudgetSpent, RedisBudget, bounded, opens_breaker, redis_failure


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(app.redis_client.time, "monotonic", fake)
    return fake


def test_time_in_calls_adds_up_until_the_budget_is_spent(clock: Clock) -> None:
    """Two calls of 30 ms against a 50 ms budget: the second spends it, the third is refused before it starts."""
    budget = RedisBudget(0.05)
    with budget.bound():
        clock.now += 0.03
    assert not budget.spent
    with budget.bound():
        clock.now += 0.03
    assert budget.spent
    with pytest.raises(BudgetSpent) as refused, budget.bound():
        raise AssertionError("a call with no budget left must not run")
    # Skipping Redis for this one request says nothing about Redis: the breaker stays as it is.
    assert isinstance(refused.value, redis.TimeoutError) and not opens_breaker(refused.value)
    assert opens_breaker(redis.TimeoutError("Redis did not answer"))


def test_time_outside_calls_is_not_counted(clock: Clock) -> None:
    """Only Redis calls count: a long request with quick Redis calls keeps its budget."""
    budget = RedisBudget(0.05)
    for _ in range(3):
        with budget.bound():
            clock.now += 0.001
        clock.now += 10.0
    assert not budget.spent


def test_a_failed_call_counts_too(clock: Clock) -> None:
    """A call that raised (Redis timed out) still spent its time."""
    budget = RedisBudget(0.05)
    with pytest.raises(redis.ConnectionError), budget.bound():
        clock.now += 0.06
        raise redis.ConnectionError("gone")
    assert budget.spent


def test_no_budget_means_no_bound() -> None:
    """Background work (renewals, owed settlements) runs without a request budget."""
    with bounded(None):
        pass


@pytest.mark.parametrize(("exc", "kind"), [
    (redis.ConnectionError("refused"), DOWN),
    (redis.TimeoutError("slow"), DOWN),
    (redis.exceptions.ResponseError("BUSY Redis is busy running a script"), DOWN),
    (redis.exceptions.ReadOnlyError("READONLY You can't write against a read only replica"), DOWN),
    (redis.exceptions.RedisClusterException("no node reachable"), DOWN),
    (redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), CALL),
    (BudgetSpent("spent"), BUDGET),
    (ValueError("a bug"), None),
])
def test_one_function_says_what_a_redis_failure_means(exc: BaseException, kind: str | None) -> None:
    """Down (every caller should back off), one call refused, only this request's budget spent, or no Redis failure."""
    assert redis_failure(exc) == kind
