"""Admission (limits -> limiter -> fail-open/closed) against a real Redis, without a gateway process."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
import redis

from app.auth import Tenant, TenantLimits
from app.errors import RateLimited, ServiceUnavailable
from app.ratelimit.admission import Admission, estimate_tokens
from app.ratelimit.limiter import RateLimiter
from tests.support import REDIS_URL

pytestmark = pytest.mark.redis


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    yield conn
    conn.close()


@pytest.fixture
def tenants(client: redis.Redis) -> Iterator[Any]:
    """Makes tenants with unique names; deletes their keys afterwards."""
    made: list[str] = []
    limiter = RateLimiter(client)

    def make(**limits: int) -> Tenant:
        name = "rladm-" + uuid.uuid4().hex
        made.append(name)
        return Tenant(name=name, limits=TenantLimits(**limits))

    yield make
    for name in made:
        client.delete(*limiter.keys_for(name).values())


def rid() -> str:
    return uuid.uuid4().hex


@pytest.mark.parametrize("fail_closed", [False, True], ids=["fail-open", "fail-closed"])
def test_one_call_refused_by_redis_does_not_open_the_breaker(
    client: redis.Redis, tenants: Any, fail_closed: bool
) -> None:
    """A Redis error answer for one tenant fails that request by the setting; other tenants stay limited."""
    admission = Admission(RateLimiter(client), fail_closed=fail_closed)
    broken, healthy = tenants(rpm=10), tenants(rpm=1)
    client.rpush(admission.limiter.keys_for(broken.name)["requests"], "not a GCRA key")  # WRONGTYPE for GET
    if fail_closed:
        with pytest.raises(ServiceUnavailable):
            admission.admit(broken, request_id=rid(), estimated_tokens=1)
    else:
        ticket = admission.admit(broken, request_id=rid(), estimated_tokens=1)
        assert ticket.reservation is None and ticket.headers == {}
    assert admission.breaker.available(time.time())
    first = admission.admit(healthy, request_id=rid(), estimated_tokens=1)
    assert first.headers["x-ratelimit-limit-requests"] == "1"
    with pytest.raises(RateLimited):
        admission.admit(healthy, request_id=rid(), estimated_tokens=1)


@pytest.mark.parametrize("max_tokens", [10**16, 2**63], ids=["1e16", "2**63"])
def test_huge_max_tokens_is_limited_not_failed_open(client: redis.Redis, tenants: Any, max_tokens: int) -> None:
    """A huge max_tokens reserves the whole token budget: limited as usual, the breaker stays shut."""
    admission = Admission(RateLimiter(client), fail_closed=False)
    tenant = tenants(tpm=1000)
    ticket = admission.admit(tenant, request_id=rid(), estimated_tokens=estimate_tokens(400, max_tokens))
    assert ticket.reservation is not None and ticket.reservation.reserved_tokens == 1000
    assert ticket.headers["x-ratelimit-remaining-tokens"] == "0"
    assert admission.breaker.available(time.time())
    with pytest.raises(RateLimited):
        admission.admit(tenant, request_id=rid(), estimated_tokens=estimate_tokens(400, None))
    admission.finish(ticket, 300)


def test_leases_are_renewed_while_the_request_runs(client: redis.Redis, tenants: Any) -> None:
    """A request running past the lease keeps its slot (renewed in a greenlet); finish stops that and frees it."""
    admission = Admission(RateLimiter(client, lease_seconds=0.3), fail_closed=False, renew_leases=True)
    tenant = tenants(concurrency=1)
    ticket = admission.admit(tenant, request_id=rid(), estimated_tokens=1)
    assert ticket.reservation is not None
    gevent.sleep(0.8)  # well past the 0.3 s lease
    with pytest.raises(RateLimited):
        admission.admit(tenant, request_id=rid(), estimated_tokens=1)
    admission.finish(ticket, 0)
    gevent.sleep(0)  # let the renewing greenlet see it was killed
    assert client.exists(admission.limiter.keys_for(tenant.name)["concurrency"]) == 0
    gevent.sleep(0.3)
    assert client.exists(admission.limiter.keys_for(tenant.name)["concurrency"]) == 0  # not renewed back
    again = admission.admit(tenant, request_id=rid(), estimated_tokens=1)
    admission.finish(again, 0)
