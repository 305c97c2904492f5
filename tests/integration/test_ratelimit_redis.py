"""The rate limiter against a real Redis (and a real Redis Cluster when REDIS_CLUSTER_URL is set)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from app.ratelimit import (
    Decision,
    RateLimiter,
    RateLimiterCallFailed,
    RateLimiterUnavailable,
    Reservation,
)
from app.ratelimit import Limits as _Limits
from app.ratelimit.admission import decision_headers
from tests.cluster import STANDALONE_OR_CLUSTER, standalone_or_cluster

pytestmark = pytest.mark.redis


def Limits(**limits: Any) -> _Limits:  # noqa: N802 - reads like the class it builds
    """A whole window of burst (RATE_LIMIT_BURST=1): these tests check the GCRA against the limit itself;
    test_ratelimit_burst.py has the default's."""
    return _Limits(**{"burst": 1.0, **limits})


@pytest.fixture(params=STANDALONE_OR_CLUSTER)
def client(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The shared test Redis, plus a cluster."""
    yield from standalone_or_cluster(request)


class Tenant:
    """A unique tenant name whose keys (tenant and per model) are deleted after the test."""

    def __init__(self, client: Any, limiter: RateLimiter) -> None:
        self.name = "rltest-" + uuid.uuid4().hex
        self.client = client
        self.limiter = limiter
        self.models: set[str | None] = {None}

    def key_names(self, model: str | None = None) -> dict[str, str]:
        self.models.add(model)
        return self.limiter.keys_for(self.name, model)

    def cleanup(self) -> None:
        for model in self.models:
            for key in self.limiter.keys_for(self.name, model).values():
                self.client.delete(key)


@pytest.fixture
def limiter(client: Any) -> RateLimiter:
    return RateLimiter(client)


@pytest.fixture
def tenant(client: Any, limiter: RateLimiter) -> Iterator[Tenant]:
    t = Tenant(client, limiter)
    yield t
    t.cleanup()


def dead_client() -> redis.Redis:
    """A client for a port nothing listens on, without redis-py's default backoff retries."""
    return redis.Redis(
        host="127.0.0.1", port=1, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )


def rid() -> str:
    return uuid.uuid4().hex


def burst(limiter: RateLimiter, tenant: str, limits: _Limits, count: int, **kw: Any) -> list[Decision]:
    return [limiter.acquire(tenant, limits, request_id=rid(), **kw) for _ in range(count)]


def test_concurrent_clients_get_exactly_n_admitted(limiter: RateLimiter, tenant: Tenant) -> None:
    """50 concurrent requests against 10 rpm: exactly 10 admitted, the rest 429 with headers."""
    limits = Limits(rpm=10)
    with ThreadPoolExecutor(max_workers=25) as pool:
        decisions = list(
            pool.map(
                lambda _: limiter.acquire(tenant.name, limits, request_id=rid()),
                range(50),
            )
        )
    admitted = [d for d in decisions if d.allowed]
    refused = [d for d in decisions if not d.allowed]
    assert len(admitted) == 10
    assert sorted(int(decision_headers(d)["x-ratelimit-remaining-requests"]) for d in admitted) == list(range(10))
    for d in admitted:
        assert d.retry_after == 0 and d.dimension is None and d.reservation is not None
        assert "Retry-After" not in decision_headers(d)
    for d in refused:
        assert d.dimension == "requests"
        assert d.reservation is None
        # The next slot opens one emission interval (6 s) after the first admission.
        assert 4 < d.retry_after <= 6
        assert decision_headers(d)["x-ratelimit-limit-requests"] == "10"
        assert decision_headers(d)["x-ratelimit-remaining-requests"] == "0"
        assert decision_headers(d)["Retry-After"] == "6"
        assert decision_headers(d)["x-ratelimit-reset-requests"].endswith("s")
        assert not any(k.startswith("x-ratelimit-") and "tokens" in k for k in decision_headers(d))


def test_no_second_burst_after_part_of_the_window(limiter: RateLimiter, tenant: Tenant) -> None:
    """After spending N, a quarter of the window refills about N/4, not another N."""
    limits = Limits(rpm=10, window_seconds=2)
    assert all(d.allowed for d in burst(limiter, tenant.name, limits, 10))
    assert not limiter.acquire(tenant.name, limits, request_id=rid()).allowed
    time.sleep(0.5)  # one request per 0.2 s refills: 2 more (3 if the sleep overruns)
    admitted = sum(d.allowed for d in burst(limiter, tenant.name, limits, 10))
    assert 1 <= admitted <= 4


def test_admitted_again_after_the_window(client: Any, limiter: RateLimiter, tenant: Tenant) -> None:
    """Once the window has passed the tenant has its full burst back and no key is left."""
    limits = Limits(rpm=5, window_seconds=1)
    assert all(d.allowed for d in burst(limiter, tenant.name, limits, 5))
    refused = limiter.acquire(tenant.name, limits, request_id=rid())
    assert not refused.allowed and 0 < refused.retry_after <= 0.2
    time.sleep(1.1)
    assert client.exists(tenant.key_names()["requests"]) == 0  # idle tenants leave nothing
    assert all(d.allowed for d in burst(limiter, tenant.name, limits, 5))


def test_keys_expire_when_the_bucket_refills(client: Any, limiter: RateLimiter, tenant: Tenant) -> None:
    """A GCRA key lives exactly as long as it holds debt; a concurrency set, one lease."""
    limits = Limits(rpm=10, tpm=600, concurrency=3)
    decision = limiter.acquire(tenant.name, limits, estimated_tokens=60, request_id=rid())
    keys = tenant.key_names()
    assert 5_000 < client.pttl(keys["requests"]) <= 6_000  # one request = 6 s of the minute
    assert 5_000 < client.pttl(keys["tokens"]) <= 6_000  # 60 of 600 tokens = 6 s
    assert 14_000 < client.pttl(keys["concurrency"]) <= 15_000  # the lease (renewed while the request runs)
    assert decision.reservation is not None
    limiter.release(decision.reservation)
    assert client.exists(keys["concurrency"]) == 0


def test_tokens_refused_once_settled_usage_reaches_budget(limiter: RateLimiter, tenant: Tenant) -> None:
    """The estimate is reserved, settle corrects it, and a spent budget refuses."""
    limits = Limits(tpm=100)
    first = limiter.acquire(tenant.name, limits, estimated_tokens=30, request_id=rid())
    assert first.allowed and first.reservation is not None
    assert decision_headers(first)["x-ratelimit-limit-tokens"] == "100"
    assert decision_headers(first)["x-ratelimit-remaining-tokens"] == "70"
    assert "x-ratelimit-limit-requests" not in decision_headers(first)
    limiter.settle(first.reservation, 60)  # used 60: 30 more than reserved

    second = limiter.acquire(tenant.name, limits, estimated_tokens=40, request_id=rid())
    assert second.allowed and second.reservation is not None
    assert decision_headers(second)["x-ratelimit-remaining-tokens"] == "0"
    limiter.settle(second.reservation, 40)

    refused = limiter.acquire(tenant.name, limits, request_id=rid())
    assert not refused.allowed
    assert refused.dimension == "tokens"
    assert refused.retry_after > 0
    assert decision_headers(refused)["x-ratelimit-remaining-tokens"] == "0"
    assert int(decision_headers(refused)["Retry-After"]) >= 1


def test_negative_settle_gives_tokens_back(limiter: RateLimiter, tenant: Tenant) -> None:
    """Settling below the estimate returns the difference to the budget."""
    limits = Limits(tpm=100)
    big = limiter.acquire(tenant.name, limits, estimated_tokens=90, request_id=rid())
    assert big.allowed and big.reservation is not None
    assert not limiter.acquire(tenant.name, limits, estimated_tokens=20, request_id=rid()).allowed
    limiter.settle(big.reservation, 10)  # only 10 used: 80 come back
    after = limiter.acquire(tenant.name, limits, estimated_tokens=20, request_id=rid())
    assert after.allowed
    assert decision_headers(after)["x-ratelimit-remaining-tokens"] == "70"


def test_settling_everything_back_deletes_the_key(client: Any, limiter: RateLimiter, tenant: Tenant) -> None:
    """A request that used no tokens leaves no token key behind."""
    decision = limiter.acquire(tenant.name, Limits(tpm=100), estimated_tokens=50, request_id=rid())
    assert decision.reservation is not None
    limiter.settle(decision.reservation, 0)
    assert client.exists(tenant.key_names()["tokens"]) == 0


def test_refusal_consumes_nothing(limiter: RateLimiter, tenant: Tenant) -> None:
    """If one dimension refuses, the others are not charged."""
    limits = Limits(rpm=10, tpm=100)
    first = limiter.acquire(tenant.name, limits, estimated_tokens=90, request_id=rid())
    assert decision_headers(first)["x-ratelimit-remaining-requests"] == "9"
    refused = limiter.acquire(tenant.name, limits, estimated_tokens=20, request_id=rid())
    assert not refused.allowed and refused.dimension == "tokens"
    assert decision_headers(refused)["x-ratelimit-remaining-requests"] == "9"
    assert decision_headers(refused)["x-ratelimit-remaining-tokens"] == "10"
    ok = limiter.acquire(tenant.name, limits, estimated_tokens=5, request_id=rid())
    assert ok.allowed
    assert decision_headers(ok)["x-ratelimit-remaining-requests"] == "8"
    assert decision_headers(ok)["x-ratelimit-remaining-tokens"] == "5"


def test_request_larger_than_budget_reserves_the_budget_and_real_usage_leaves_debt(
    limiter: RateLimiter, tenant: Tenant
) -> None:
    """An estimate above the budget takes the whole budget (not more); usage beyond it, once settled, is debt."""
    limits = Limits(tpm=100)
    huge = limiter.acquire(tenant.name, limits, estimated_tokens=250, request_id=rid())
    assert huge.allowed and huge.reservation is not None
    assert huge.reservation.reserved_tokens == 100
    assert decision_headers(huge)["x-ratelimit-remaining-tokens"] == "0"
    during = limiter.acquire(tenant.name, limits, request_id=rid())
    assert not during.allowed and during.retry_after <= 0.6  # one token's interval, no debt from a guess
    limiter.settle(huge.reservation, 250)  # it really used 250: 150 beyond the budget
    after = limiter.acquire(tenant.name, limits, request_id=rid())
    assert not after.allowed and after.retry_after > 60  # 150 tokens of debt to repay first


@pytest.mark.parametrize("estimate", [10**16, 2**63, 10**400], ids=["1e16", "2**63", "1e400"])
def test_absurd_estimate_is_clamped_to_the_budget(
    client: Any, limiter: RateLimiter, tenant: Tenant, estimate: int
) -> None:
    """A max_tokens of 1e16 or 2**63 reserves the whole budget instead of overflowing the script into an error."""
    limits = Limits(rpm=10, tpm=1000, concurrency=2)
    decision = limiter.acquire(tenant.name, limits, estimated_tokens=estimate, request_id=rid())
    assert decision.allowed and decision.reservation is not None
    assert decision.reservation.reserved_tokens == 1000
    assert decision_headers(decision)["x-ratelimit-remaining-tokens"] == "0"
    assert 0 < client.pttl(tenant.key_names()["tokens"]) <= 60_000  # one window, never more
    refused = limiter.acquire(tenant.name, limits, request_id=rid())
    assert not refused.allowed and refused.dimension == "tokens" and refused.retry_after < 1
    limiter.finish(decision.reservation, 10)  # it used 10: 990 come back
    again = limiter.acquire(tenant.name, limits, estimated_tokens=100, request_id=rid())
    assert again.allowed and 890 <= int(decision_headers(again)["x-ratelimit-remaining-tokens"]) <= 892


def test_each_token_limit_holds_at_most_its_own_budget(limiter: RateLimiter, tenant: Tenant) -> None:
    """Tenant tpm 1000 and model tpm 100, estimate 500: the tenant holds 500, the model 100, each settled right."""
    tenant.key_names("m")
    limits, model_limits = Limits(tpm=1000, window_seconds=3600), Limits(tpm=100)  # no tenant refill mid-test
    kw: dict[str, Any] = {"model": "m", "model_limits": model_limits}
    first = limiter.acquire(tenant.name, limits, estimated_tokens=500, request_id=rid(), **kw)
    assert first.allowed and first.reservation is not None
    assert decision_headers(first)["x-ratelimit-remaining-tokens"] == "0"  # the model's, the tighter
    model_only = limiter.acquire(tenant.name, Limits(), estimated_tokens=1, request_id=rid(), **kw)
    assert not model_only.allowed and model_only.retry_after < 1  # the model holds 100, not 500
    tenant_only = limiter.acquire(tenant.name, limits, estimated_tokens=1, request_id=rid())
    assert decision_headers(tenant_only)["x-ratelimit-remaining-tokens"] == "499"
    limiter.settle(first.reservation, 50)
    after = limiter.acquire(tenant.name, limits, estimated_tokens=1, request_id=rid(), **kw)
    assert after.allowed and decision_headers(after)["x-ratelimit-remaining-tokens"] == "49"  # model: 100 - 50 - 1
    tenant_after = limiter.acquire(tenant.name, limits, estimated_tokens=1, request_id=rid())
    assert decision_headers(tenant_after)["x-ratelimit-remaining-tokens"] == "947"  # 1000 - 50 - 1 - 1 - 1


def test_scripts_clamp_what_python_would_not_send(client: Any, limiter: RateLimiter, tenant: Tenant) -> None:
    """Defence in depth: the scripts keep TTLs in range even for a cost, debt or lease Python never sends."""
    keys = tenant.key_names()
    args = [rid(), 10**30, 10**30, "t", 1000, 60_000_000, 10**30, "c", 2, 60_000_000, 1]
    reply = limiter._acquire(keys=[keys["tokens"], keys["concurrency"]], args=args)
    assert int(reply[0]) == 1
    assert 0 < client.pttl(keys["tokens"]) <= 60_000
    assert 0 < client.pttl(keys["concurrency"]) <= 366 * 86_400_000
    limiter.settle(Reservation(request_id="r", reserved_tokens=1, token_keys=((keys["tokens"], 1000, 60_000_000),)),
                   10**30)
    assert 0 < client.pttl(keys["tokens"]) <= 366 * 86_400_000
    refused = limiter.acquire(tenant.name, Limits(tpm=1000), request_id=rid())
    assert not refused.allowed and 0 < refused.retry_after <= 366 * 86_400


def test_redis_refusing_one_call_is_not_redis_down(client: Any, limiter: RateLimiter, tenant: Tenant) -> None:
    """A Redis error answer (here WRONGTYPE) raises RateLimiterCallFailed, not RateLimiterUnavailable."""
    client.rpush(tenant.key_names()["requests"], "not a GCRA key")
    with pytest.raises(RateLimiterCallFailed) as info:
        limiter.acquire(tenant.name, Limits(rpm=10), request_id=rid())
    assert not isinstance(info.value, RateLimiterUnavailable)
    assert isinstance(info.value.__cause__, redis.ResponseError)
    client.delete(tenant.key_names()["requests"])
    client.rpush(tenant.key_names()["tokens"], "not a GCRA key")
    reservation = Reservation(request_id="r", reserved_tokens=5,
                              token_keys=((tenant.key_names()["tokens"], 10, 60_000_000),))
    with pytest.raises(RateLimiterCallFailed):
        limiter.settle(reservation, 1)


def test_concurrency_limit_and_release(limiter: RateLimiter, tenant: Tenant) -> None:
    """With 2 slots, the third request waits until one is released."""
    limits = Limits(concurrency=2)
    a, b = burst(limiter, tenant.name, limits, 2)
    assert a.allowed and b.allowed and a.reservation is not None
    third = limiter.acquire(tenant.name, limits, request_id=rid())
    assert not third.allowed
    assert third.dimension == "concurrency"
    assert decision_headers(third) == {"Retry-After": "1"}
    limiter.release(a.reservation)
    limiter.release(a.reservation)  # idempotent
    assert limiter.acquire(tenant.name, limits, request_id=rid()).allowed
    assert not limiter.acquire(tenant.name, limits, request_id=rid()).allowed


def test_same_request_id_holds_one_slot(limiter: RateLimiter, tenant: Tenant) -> None:
    """A request asking again under its own id does not take a second slot."""
    limits = Limits(concurrency=1)
    request_id = rid()
    assert limiter.acquire(tenant.name, limits, request_id=request_id).allowed
    assert limiter.acquire(tenant.name, limits, request_id=request_id).allowed
    assert not limiter.acquire(tenant.name, limits, request_id=rid()).allowed


def test_crashed_worker_slot_expires_with_its_lease(client: Any, tenant: Tenant) -> None:
    """A slot never released frees itself when its lease ends."""
    limiter = RateLimiter(client, lease_seconds=0.3)
    limits = Limits(concurrency=1)
    assert limiter.acquire(tenant.name, limits, request_id=rid()).allowed
    assert not limiter.acquire(tenant.name, limits, request_id=rid()).allowed
    time.sleep(0.4)
    assert limiter.acquire(tenant.name, limits, request_id=rid()).allowed


def test_renew_keeps_a_long_request_its_slot(client: Any, tenant: Tenant) -> None:
    """Renewing before the lease ends keeps the slot past it; once released, renew reports nothing held."""
    limiter = RateLimiter(client, lease_seconds=0.3)
    limits = Limits(concurrency=1)
    held = limiter.acquire(tenant.name, limits, request_id=rid())
    assert held.allowed and held.reservation is not None
    for _ in range(3):
        time.sleep(0.2)
        assert limiter.renew(held.reservation)
    # 0.6 s in, twice the lease: still held
    assert not limiter.acquire(tenant.name, limits, request_id=rid()).allowed
    limiter.release(held.reservation)
    assert not limiter.renew(held.reservation)
    assert client.exists(tenant.key_names()["concurrency"]) == 0  # renew did not bring it back
    assert limiter.acquire(tenant.name, limits, request_id=rid()).allowed


def test_finish_settles_and_releases_in_one_call(client: Any, limiter: RateLimiter, tenant: Tenant) -> None:
    """finish() corrects tokens and frees the slot together."""
    limits = Limits(tpm=100, concurrency=1)
    d = limiter.acquire(tenant.name, limits, estimated_tokens=50, request_id=rid())
    assert d.reservation is not None
    limiter.finish(d.reservation, 20)
    assert client.exists(tenant.key_names()["concurrency"]) == 0
    again = limiter.acquire(tenant.name, limits, estimated_tokens=10, request_id=rid())
    assert again.allowed and decision_headers(again)["x-ratelimit-remaining-tokens"] == "70"


def test_model_limits_apply_on_top_of_tenant_limits(limiter: RateLimiter, tenant: Tenant) -> None:
    """A tight per-model limit refuses that model only; the tighter numbers are shown."""
    tenant.key_names("gpt-4o")
    tenant.key_names("other")
    limits, model_limits = Limits(rpm=100), Limits(rpm=2, concurrency=5)
    kw: dict[str, Any] = {"model": "gpt-4o", "model_limits": model_limits}
    decisions = burst(limiter, tenant.name, limits, 3, **kw)
    assert [d.allowed for d in decisions] == [True, True, False]
    assert decision_headers(decisions[1])["x-ratelimit-limit-requests"] == "2"
    assert decisions[2].dimension == "requests"
    other = limiter.acquire(tenant.name, limits, model="other", model_limits=model_limits, request_id=rid())
    assert other.allowed
    # 2 for gpt-4o + 1 for other; the refused one was not charged to the tenant
    assert decision_headers(other)["x-ratelimit-limit-requests"] == "2"
    assert other.reservation is not None and len(other.reservation.concurrency_keys) == 1
    no_model = limiter.acquire(tenant.name, limits, request_id=rid())
    assert decision_headers(no_model)["x-ratelimit-remaining-requests"] == "96"


def test_script_flush_is_survived(client: Any, limiter: RateLimiter, tenant: Tenant) -> None:
    """After SCRIPT FLUSH (restart, failover) the next calls reload the scripts (NOSCRIPT)."""
    limits = Limits(rpm=10, tpm=100, concurrency=2)
    first = limiter.acquire(tenant.name, limits, estimated_tokens=10, request_id=rid())
    assert first.allowed and first.reservation is not None
    client.script_flush()
    second = limiter.acquire(tenant.name, limits, estimated_tokens=10, request_id=rid())
    assert second.allowed
    assert decision_headers(second)["x-ratelimit-remaining-requests"] == "8"
    client.script_flush()
    limiter.finish(first.reservation, 5)
    assert not limiter.acquire(tenant.name, Limits(concurrency=1), request_id=rid()).allowed


def test_ensure_loaded_loads_scripts(client: Any, limiter: RateLimiter) -> None:
    """ensure_loaded() makes the scripts known to Redis before any request."""
    client.script_flush()
    limiter.ensure_loaded()
    assert all(client.script_exists(limiter._acquire.sha, limiter._finish.sha))


def test_unreachable_redis_raises_unavailable() -> None:
    """When Redis cannot be asked the caller gets RateLimiterUnavailable, caused by the redis error."""
    dead = dead_client()
    limiter = RateLimiter(dead)
    with pytest.raises(RateLimiterUnavailable) as info:
        limiter.acquire("t", Limits(rpm=1), request_id=rid())
    assert isinstance(info.value.__cause__, redis.RedisError)
    reservation = Reservation(request_id="r", reserved_tokens=5, token_keys=(("gw:{t}:tpm", 10, 60_000_000),))
    with pytest.raises(RateLimiterUnavailable):
        limiter.settle(reservation, 1)
    with pytest.raises(RateLimiterUnavailable):
        limiter.release(Reservation(request_id="r", concurrency_keys=("gw:{t}:conc",)))
    with pytest.raises(RateLimiterUnavailable):
        limiter.ensure_loaded()
    dead.close()


def test_all_zero_limits_never_touch_redis() -> None:
    """With every limit off the limiter answers without Redis (a dead client still works)."""
    dead = dead_client()
    limiter = RateLimiter(dead)
    decision = limiter.acquire("t", Limits(), estimated_tokens=50, model="m", model_limits=Limits(), request_id="r")
    assert decision.allowed and decision_headers(decision) == {} and decision.retry_after == 0
    assert decision.reservation is not None
    limiter.settle(decision.reservation, 500)
    limiter.release(decision.reservation)
    limiter.finish(decision.reservation, 500)
    dead.close()


@pytest.mark.cluster
def test_cluster_keys_share_one_slot_and_survive_flush() -> None:
    """On Redis Cluster all of a call's keys sit in one slot and NOSCRIPT is handled."""
    url = os.environ.get("REDIS_CLUSTER_URL")
    if not url:
        pytest.skip("REDIS_CLUSTER_URL is not set")
    cluster = RedisCluster.from_url(url, socket_timeout=2)
    limiter = RateLimiter(cluster)
    tenant = Tenant(cluster, limiter)
    try:
        keys = [*tenant.key_names().values(), *tenant.key_names("gpt-4o").values()]
        assert len({cluster.keyslot(k) for k in keys}) == 1
        limiter.ensure_loaded()
        limits = Limits(rpm=3, tpm=1000, concurrency=2)
        kw: dict[str, Any] = {"model": "gpt-4o", "model_limits": Limits(rpm=2)}
        assert limiter.acquire(tenant.name, limits, request_id=rid(), **kw).allowed
        cluster.script_flush()
        d = limiter.acquire(tenant.name, limits, request_id=rid(), **kw)
        assert d.allowed and d.reservation is not None
        assert not limiter.acquire(tenant.name, limits, request_id=rid(), **kw).allowed
        limiter.finish(d.reservation, 3)
    finally:
        tenant.cleanup()
        cluster.close()
