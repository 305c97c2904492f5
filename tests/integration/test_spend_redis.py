"""Budgets in the limiter's script and the daily spend rollups, against a real Redis (and a real Redis Cluster
when REDIS_CLUSTER_URL is set: tests/integration/test_cluster.py runs this file's cluster variants)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import gevent
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.auth import Tenant
from app.breaker import Breaker
from app.errors import ServiceUnavailable
from app.ratelimit.admission import BUDGET_SETTLE_SECONDS, Admission, decision_headers
from app.ratelimit.limiter import BudgetCharge, Limits, RateLimiter
from app.spend.budget import Budget
from app.spend.ledger import SpendLedger
from tests.cluster import STANDALONE_OR_CLUSTER, standalone_or_cluster

pytestmark = pytest.mark.redis

USD = 1_000_000_000  # nano-dollars


@pytest.fixture(params=STANDALONE_OR_CLUSTER)
def client(request: pytest.FixtureRequest) -> Iterator[Any]:
    yield from standalone_or_cluster(request)


@pytest.fixture
def tenant() -> str:
    return "budget-" + uuid.uuid4().hex[:12]


def charge(limit: int, reserve: int, window_id: str = "w1", ends_in: float = 3600.0) -> BudgetCharge:
    return BudgetCharge("day", window_id, limit, time.time() + ends_in, reserve)


def test_reserves_the_worst_case_and_refuses_what_would_not_fit(client: Any, tenant: str) -> None:
    """A $1 cap with $0.30 worst cases: three admitted, the fourth refused on `budget` until the window ends."""
    limiter = RateLimiter(client)
    decisions = [limiter.acquire(tenant, Limits(), budgets=[charge(USD, USD * 3 // 10)], request_id=str(i))
                 for i in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    refused = decisions[3]
    assert refused.dimension == "budget"
    assert 3590 < refused.retry_after <= 3601  # until the window's reset (by Redis's clock)
    assert decision_headers(refused)["x-budget-limit-usd-day"] == "1"
    assert decision_headers(refused)["x-budget-remaining-usd-day"] == "0.1"
    assert int(client.get(limiter.budget_key(tenant, "w1"))) == 9 * USD // 10  # a refusal consumes nothing
    assert decision_headers(decisions[0])["x-budget-remaining-usd-day"] == "0.7"


def test_settling_to_the_real_cost_gives_back_the_difference(client: Any, tenant: str) -> None:
    """Settled at $0.10 instead of the $0.30 reserved, the counter holds $0.10 and more fits again."""
    limiter = RateLimiter(client)
    key = limiter.budget_key(tenant, "w1")
    first = limiter.acquire(tenant, Limits(), budgets=[charge(USD // 2, 3 * USD // 10)], request_id="a")
    assert not limiter.acquire(tenant, Limits(), budgets=[charge(USD // 2, 3 * USD // 10)], request_id="b").allowed
    assert first.reservation is not None
    limiter.finish(first.reservation, None, USD // 10)
    assert int(client.get(key)) == USD // 10
    assert limiter.acquire(tenant, Limits(), budgets=[charge(USD // 2, 3 * USD // 10)], request_id="c").allowed
    # the window plus the settling grace; the window's end goes to Redis rounded to the millisecond (+1)
    assert 3590 * 1000 < client.pttl(key) <= (3600 + 3600) * 1000 + 1


def test_unknown_cost_keeps_the_reservation(client: Any, tenant: str) -> None:
    """A request whose usage never came (None) stays charged at its worst case."""
    limiter = RateLimiter(client)
    decision = limiter.acquire(tenant, Limits(), budgets=[charge(USD, USD // 4)], request_id="a")
    assert decision.reservation is not None
    limiter.finish(decision.reservation, None, None)
    assert int(client.get(limiter.budget_key(tenant, "w1"))) == USD // 4


def test_a_new_window_starts_from_zero(client: Any, tenant: str) -> None:
    """The budget frees at the reset: the next window is a counter of its own."""
    limiter = RateLimiter(client)
    assert limiter.acquire(tenant, Limits(), budgets=[charge(USD, USD, "w1")], request_id="a").allowed
    assert not limiter.acquire(tenant, Limits(), budgets=[charge(USD, 1, "w1")], request_id="b").allowed
    assert limiter.acquire(tenant, Limits(), budgets=[charge(USD, USD, "w2")], request_id="c").allowed


def test_day_and_month_both_must_admit_and_the_refusing_one_is_reported(client: Any, tenant: str) -> None:
    """A month with room does not let the day's spent budget through; the headers show both windows."""
    limiter = RateLimiter(client)
    windows = [BudgetCharge("day", "d1", USD, time.time() + 60, USD // 2),
               BudgetCharge("month", "m1", 10 * USD, time.time() + 86400, USD // 2)]
    assert all(limiter.acquire(tenant, Limits(), budgets=windows, request_id=str(i)).allowed for i in range(2))
    refused = limiter.acquire(tenant, Limits(), budgets=windows, request_id="3")
    assert not refused.allowed and refused.dimension == "budget"
    assert refused.retry_after < 61  # the day's reset, not the month's
    assert decision_headers(refused)["x-budget-remaining-usd-day"] == "0"
    assert decision_headers(refused)["x-budget-remaining-usd-month"] == "9"


def test_budget_rides_in_the_rate_limit_call_and_a_rate_refusal_holds_no_money(client: Any, tenant: str) -> None:
    """One script call decides rpm and budget together: refused by rpm, the budget is not charged."""
    limiter = RateLimiter(client)
    limits = Limits(rpm=1, burst=1.0)
    assert limiter.acquire(tenant, limits, budgets=[charge(USD, USD // 10)], request_id="a").allowed
    refused = limiter.acquire(tenant, limits, budgets=[charge(USD, USD // 10)], request_id="b")
    assert not refused.allowed and refused.dimension == "requests"
    assert int(client.get(limiter.budget_key(tenant, "w1"))) == USD // 10
    for key in limiter.keys_for(tenant).values():
        client.delete(key)


def test_concurrent_reservations_never_pass_the_cap(client: Any, tenant: str) -> None:
    """40 threads against a cap of 7 worst cases: exactly 7 admitted."""
    limiter = RateLimiter(client)

    def one(i: int) -> bool:
        return limiter.acquire(tenant, Limits(), budgets=[charge(7 * USD, USD)], request_id=str(i)).allowed

    with ThreadPoolExecutor(20) as pool:
        assert sum(pool.map(one, range(40))) == 7


def test_no_budget_no_key(client: Any, tenant: str) -> None:
    """A tenant without a budget touches no budget counter (and without limits, no Redis at all)."""
    limiter = RateLimiter(client)
    decision = limiter.acquire(tenant, Limits(), request_id="a")
    assert decision.allowed and not decision_headers(decision)
    assert client.exists(limiter.budget_key(tenant, "w1")) == 0


# -- rollups --------------------------------------------------------------------------------------------------------


def ledger(client: Any, retention_days: int = 3) -> SpendLedger:
    return SpendLedger(client, Breaker(), retention_days=retention_days, prefix="gwtest" + uuid.uuid4().hex[:6],
                       background=False)


def test_rollups_add_up_per_tenant_and_model_and_group(client: Any, tenant: str) -> None:
    """Two workers' buffers, flushed, read back grouped by tenant+model, by day and by model, and filtered."""
    one, two = ledger(client), ledger(client)
    two.prefix = one.prefix
    now = datetime.now(UTC)
    today, yesterday = now.strftime("%Y%m%d"), (now - timedelta(days=1)).strftime("%Y%m%d")
    one.add(tenant, "deepseek-chat", today, {"requests": 2, "input_tokens": 100, "cost_nanos": 500})
    two.add(tenant, "deepseek-chat", today, {"requests": 1, "cache_hits": 1, "hits_L1": 1, "saved_nanos": 70,
                                             "saved_nanos_L1": 70})
    two.add(tenant, "gpt-4o", yesterday, {"requests": 1, "output_tokens": 9, "cost_nanos": 1_000_000_000})
    one.add(tenant + "x", "gpt-4o", today, {"requests": 5})
    one.flush()
    two.flush()
    days = [now.date() - timedelta(days=1), now.date()]
    rows = one.report(days, tenant=tenant)
    assert [(r["tenant"], r["model"]) for r in rows] == [(tenant, "deepseek-chat"), (tenant, "gpt-4o")]
    chat = rows[0]
    assert (chat["requests"], chat["cache_hits"], chat["input_tokens"]) == (3, 1, 100)
    assert chat["cost_usd"] == 0.0000005 and chat["saved_usd"] == 0.00000007
    assert chat["cache_hits_by_layer"] == {"L0": 0, "L1": 1, "L2": 0}
    assert rows[1]["cost_usd"] == 1.0
    by_day = one.report(days, tenant=tenant, group_by=("day",))
    assert [(r["day"], r["requests"]) for r in by_day] == [(days[0].isoformat(), 1), (days[1].isoformat(), 3)]
    assert [r["requests"] for r in one.report(days, model="gpt-4o", group_by=("model",))] == [6]
    # each rollup, and each day's set of pairs, expires `retention_days` after its day
    assert 0 < client.ttl(one.rollup_key(tenant, "deepseek-chat", today)) <= 4 * 86400
    assert 0 < client.ttl(one.day_key(today)) <= 4 * 86400


def test_a_failed_flush_keeps_the_counts(tenant: str) -> None:
    """Redis down: the buffer is kept (and raised), so the next flush writes everything."""
    dead = redis.Redis(host="127.0.0.1", port=1, socket_timeout=0.2, socket_connect_timeout=0.2,
                       retry=Retry(NoBackoff(), 0))
    book = SpendLedger(dead, Breaker(), retention_days=1, background=False)
    book.add(tenant, "m", "20260101", {"requests": 1})
    with pytest.raises(redis.ConnectionError):
        book.flush()
    book.add(tenant, "m", "20260101", {"requests": 2})
    assert book.pending() == 1 and book._pending[(tenant, "m", "20260101")]["requests"] == 3


def test_batched_settlement_corrects_a_live_counter_and_never_revives_a_gone_one(client: Any, tenant: str) -> None:
    """settle_budget adds a sum of corrections; a counter whose window is long gone is not brought back."""
    limiter = RateLimiter(client)
    assert limiter.acquire(tenant, Limits(), budgets=[charge(USD, USD // 2)], request_id="a").allowed
    limiter.settle_budget(limiter.budget_key(tenant, "w1"), -USD // 4)
    assert int(client.get(limiter.budget_key(tenant, "w1"))) == USD // 4
    limiter.settle_budget(limiter.budget_key(tenant, "gone"), 5)
    assert client.exists(limiter.budget_key(tenant, "gone")) == 0


@pytest.mark.parametrize("fail_closed", [False, True], ids=["fail-open", "fail-closed"])
def test_a_budget_fails_open_or_closed_as_the_limiter_does(tenant: str, fail_closed: bool) -> None:
    """Redis unreachable: a budgeted tenant is admitted (open) or refused with 503 (closed), by the setting."""
    dead = redis.Redis(host="127.0.0.1", port=1, socket_timeout=0.2, socket_connect_timeout=0.2,
                       retry=Retry(NoBackoff(), 0))
    admission = Admission(RateLimiter(dead), fail_closed=fail_closed, renew_leases=False)
    budgeted = Tenant(name=tenant, budget=Budget(usd_per_day=1))
    if fail_closed:
        with pytest.raises(ServiceUnavailable):
            admission.admit(budgeted, request_id="a", estimated_tokens=1, worst_case_nanos=USD // 10)
    else:
        ticket = admission.admit(budgeted, request_id="a", estimated_tokens=1, worst_case_nanos=USD // 10)
        assert ticket.reservation is None
        admission.finish(ticket, 10, USD // 20)


def test_budget_corrections_alone_wait_for_the_background_in_the_worker(client: Any, tenant: str) -> None:
    """A reservation of nothing but money is settled from the background in the gevent worker, summed per counter;
    outside it (renew_leases off) at once."""
    budgeted = Tenant(name=tenant, budget=Budget(usd_per_day=1))
    inline = Admission(RateLimiter(client), fail_closed=False, renew_leases=False, budget_window_seconds=3600)
    ticket = inline.admit(budgeted, request_id="a", estimated_tokens=1, worst_case_nanos=USD // 10)
    (key,) = ticket.reservation.budget_keys  # type: ignore[union-attr]
    inline.finish(ticket, 10, USD // 20)
    assert int(client.get(key)) == USD // 20
    background = Admission(RateLimiter(client), fail_closed=False, renew_leases=True, budget_window_seconds=3600)
    tickets = [background.admit(budgeted, request_id=str(i), estimated_tokens=1, worst_case_nanos=USD // 10)
               for i in range(3)]
    for one in tickets:
        background.finish(one, 10, 0)
    assert int(client.get(key)) == USD // 20 + 3 * USD // 10 and background.owed() == 1
    gevent.sleep(BUDGET_SETTLE_SECONDS + 0.15)
    assert int(client.get(key)) == USD // 20 and background.owed() == 0
