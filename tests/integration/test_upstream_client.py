"""UpstreamClient against the mock upstream (a real local server) with key health in the real Redis.

Each test uses keys of its own: cooldowns live in one Redis hash shared with every other test and gateway.
"""

from __future__ import annotations

import email.utils
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from app.errors import UpstreamBadResponse
from app.upstream.backends import Backend, UpstreamKey, key_fingerprint
from app.upstream.client import UpstreamClient
from app.upstream.health import BACKOFF_COOLDOWN_MAX, RETRY_AFTER_COOLDOWN_MAX, KeyHealth
from app.upstream.http import build_retry, build_session
from app.upstream.pool import UpstreamPool
from tests.support import MockUpstream

pytestmark = pytest.mark.redis


@pytest.fixture
def new_key(redis_conn: redis.Redis) -> Iterator[Any]:
    """Makes keys unique to the test, and takes their shared state out of Redis afterwards."""
    made: list[UpstreamKey] = []

    def make() -> UpstreamKey:
        secret = f"sk-client-test-{uuid.uuid4().hex[:12]}"
        made.append(UpstreamKey(secret=secret, key_id=key_fingerprint(secret)))
        return made[-1]

    yield make
    if made:
        redis_conn.hdel(KeyHealth.REDIS_KEY, *(k.key_id for k in made))


@pytest.fixture(scope="module")
def other_upstream() -> Iterator[MockUpstream]:
    server = MockUpstream()
    yield server
    server.stop()


def client_for(redis_conn: redis.Redis, *backends: Backend, retries: int = 0) -> UpstreamClient:
    retry = build_retry(retries=retries, backoff_factor=0.01, backoff_max=0.05, retry_after_max=1.0)
    session = build_session(retry=retry, pool_size=4, hosts=len(backends))
    return UpstreamClient(session, UpstreamPool(list(backends), KeyHealth(redis_conn)),
                          connect_timeout=2, read_timeout=10)


def chat(client: UpstreamClient, model: str = "mock-gpt") -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return client.send("/v1/chat/completions", body, json.dumps(body).encode(), model=model, stream=False,
                       request_id=uuid.uuid4().hex)


def finished(result: Any) -> Any:
    """Read the answer (as the routes do), which also hands its connection and key back."""
    result.read()
    return result


def test_backends_with_one_name_each_reach_their_own_host(redis_conn: redis.Redis, new_key: Any,
                                                         upstream: MockUpstream,
                                                         other_upstream: MockUpstream) -> None:
    """Two backends sharing a name: each request (and key) still goes to its own backend's URL."""
    other_upstream.reset()
    alpha_key, beta_key = new_key(), new_key()
    client = client_for(
        redis_conn,
        Backend(name="same", base_url=upstream.url, keys=(alpha_key,), models=("mock-gpt",)),
        Backend(name="same", base_url=other_upstream.url + "/v1", keys=(beta_key,), models=("gpt-4o",)),
    )
    assert finished(chat(client, "mock-gpt")).status == 200
    assert finished(chat(client, "gpt-4o")).status == 200
    assert [(r["key"], r["path"]) for r in upstream.requests()] == [(alpha_key.secret, "/v1/chat/completions")]
    assert [(r["key"], r["path"]) for r in other_upstream.requests()] == [(beta_key.secret, "/v1/chat/completions")]


def test_key_rejected_on_the_last_try_is_not_left_busy(redis_conn: redis.Redis, new_key: Any,
                                                      upstream: MockUpstream) -> None:
    """After both keys were rejected (502) and restored, requests are balanced over both keys again."""
    first, second = new_key(), new_key()
    client = client_for(redis_conn, Backend(name="b", base_url=upstream.url, keys=(first, second)))
    upstream.faults({"status": 401, "times": -1})
    with pytest.raises(UpstreamBadResponse) as info:
        chat(client)
    assert info.value.status == 502 and info.value.code == "upstream_auth_failed"
    assert {r["key"] for r in upstream.requests()} == {first.secret, second.secret}

    upstream.reset()
    client.pool.health.restore(first.key_id)
    client.pool.health.restore(second.key_id)
    for _ in range(24):  # the choice between two idle keys is random: both are used (all but surely)
        assert finished(chat(client)).status == 200
    assert {r["key"] for r in upstream.requests()} == {first.secret, second.secret}


def test_models_list_rejected_by_the_upstream_is_a_gateway_error(redis_conn: redis.Redis, new_key: Any,
                                                                upstream: MockUpstream) -> None:
    """GET /v1/models answered 401: a 502 without the upstream's body, and the key is taken out."""
    key = new_key()
    client = client_for(redis_conn, Backend(name="b", base_url=upstream.url, keys=(key,)))
    upstream.faults({"status": 401, "paths": ["/v1/models"], "message": "Incorrect API key provided: sk-...abcd"})
    with pytest.raises(UpstreamBadResponse) as info:
        client.get("/v1/models", "r")
    assert info.value.status == 502 and "abcd" not in info.value.message
    assert client.pool.health.state(key.key_id, time.time()) == "disabled"


@pytest.mark.parametrize("header", ["inf", "nan", "-5", "soon"])
def test_unusable_retry_after_rests_the_key_briefly(redis_conn: redis.Redis, new_key: Any, upstream: MockUpstream,
                                                    header: str) -> None:
    """A Retry-After that is no usable number: the client gets a 429 with a short Retry-After, and the key
    cools down for a backoff (not taken out for good)."""
    key = new_key()
    client = client_for(redis_conn, Backend(name="b", base_url=upstream.url, keys=(key,)), retries=1)
    upstream.faults({"status": 429, "headers": {"Retry-After": header}, "times": -1})
    result = finished(chat(client))
    assert result.status == 429
    assert 1 <= int(result.extra_headers["Retry-After"]) <= 2  # the first backoff step
    assert client.pool.health.state(key.key_id, time.time()) == "cooling"


def test_limited_key_with_infinite_retry_after_comes_back(redis_conn: redis.Redis, new_key: Any,
                                                         upstream: MockUpstream) -> None:
    """`Retry-After: inf` on one key: the request moves to the other key, and the first is cooling, not disabled."""
    limited, spare = new_key(), new_key()
    client = client_for(redis_conn, Backend(name="b", base_url=upstream.url, keys=(limited, spare)))
    upstream.faults({"key": limited.secret, "status": 429, "headers": {"Retry-After": "inf"}, "times": -1})
    for _ in range(12):
        assert finished(chat(client)).status == 200
        if any(r["key"] == limited.secret for r in upstream.requests()):
            break
    else:
        pytest.fail("no request tried the limited key")
    assert client.pool.health.state(limited.key_id, time.time()) == "cooling"


@pytest.mark.parametrize("header", ["1e300", "86400000"])
def test_huge_retry_after_is_capped(redis_conn: redis.Redis, new_key: Any, upstream: MockUpstream,
                                    header: str) -> None:
    """A Retry-After of years rests the key (and tells the client to wait) at most RETRY_AFTER_COOLDOWN_MAX."""
    key = new_key()
    client = client_for(redis_conn, Backend(name="b", base_url=upstream.url, keys=(key,)))
    upstream.faults({"status": 429, "headers": {"Retry-After": header}})
    result = finished(chat(client))
    assert result.status == 429
    assert RETRY_AFTER_COOLDOWN_MAX - 2 <= int(result.extra_headers["Retry-After"]) <= RETRY_AFTER_COOLDOWN_MAX
    assert client.pool.health.state(key.key_id, time.time()) == "cooling"


def test_retry_after_as_an_http_date_is_honoured(redis_conn: redis.Redis, new_key: Any,
                                                 upstream: MockUpstream) -> None:
    """Retry-After given as an HTTP-date 30 s ahead rests the key about 30 s (not a 2 s backoff)."""
    key = new_key()
    client = client_for(redis_conn, Backend(name="b", base_url=upstream.url, keys=(key,)), retries=1)
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    upstream.faults({"status": 429, "headers": {"Retry-After": date}, "times": -1})
    result = finished(chat(client))
    assert result.status == 429
    assert 25 <= int(result.extra_headers["Retry-After"]) <= 31
    assert len(upstream.requests()) == 1  # longer than UPSTREAM_RETRY_AFTER_MAX: not waited for on this key


def test_key_limited_again_and_again_keeps_a_bounded_backoff(redis_conn: redis.Redis, new_key: Any) -> None:
    """A key limited over a thousand times in a row (no Retry-After) still rests BACKOFF_COOLDOWN_MAX, no error."""
    key = new_key()
    health = KeyHealth(redis_conn)
    now = time.time()
    for _ in range(1100):
        until = health.cool_down(key.key_id, None, now=now)
    assert until == now + BACKOFF_COOLDOWN_MAX
