"""An answer's L1 SET leaves after the answer (app/cache/exact.py): what a client and an operator see of it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
import requests

from tests.support import Gateway, MockUpstream, RedisServer, base_env

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream, own_redis: RedisServer) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, REDIS_URL=own_redis.url, UPSTREAM_MAX_RETRIES="0",
                          SEMANTIC_CACHE_ENABLED="false"))
    yield gw
    gw.stop()


def ask(gw: Gateway, text: str) -> requests.Response:
    body = {"model": "mock-gpt", "messages": [{"role": "user", "content": text}]}
    response = requests.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response


def cache_errors(gw: Gateway) -> float:
    for line in requests.get(gw.metrics_url, timeout=5).text.splitlines():
        if line.startswith('gateway_redis_errors_total{component="cache"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def entries(client: redis.Redis) -> int:
    return sum(1 for _ in client.scan_iter("gw:c:*"))


def test_a_stored_answer_reaches_redis_without_a_following_request(gateway: Gateway, own_redis: RedisServer,
                                                                   unique: str) -> None:
    """With no look-up to carry it, the SET leaves on its own within milliseconds."""
    client = redis.Redis.from_url(own_redis.url)
    before = entries(client)
    ask(gateway, f"Tell me about {unique}")
    started = time.monotonic()
    while entries(client) == before:
        assert time.monotonic() - started < 0.5, "the answer never reached Redis"
        time.sleep(0.01)


def test_a_write_redis_refuses_after_the_answer_is_counted_logged_and_costs_only_a_miss(
        gateway: Gateway, own_redis: RedisServer, unique: str) -> None:
    """Redis full (maxmemory reached, no eviction): reads work, writes fail. The miss's answer still reaches the
    client whole; the failed SET is counted and logged, and nothing reaches Redis (another worker would miss,
    never err); the worker that answered keeps the answer in its L0 and serves it again."""
    client = redis.Redis.from_url(own_redis.url)
    errors = cache_errors(gateway)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    try:
        first = ask(gateway, f"What is {unique}?")
        assert first.headers["X-Cache"] == "MISS"
        assert first.json()["choices"][0]["message"]["content"] == f"Mock answer to: What is {unique}?"
        started = time.monotonic()
        while cache_errors(gateway) <= errors:
            assert time.monotonic() - started < 2, "the failed SET was not counted"
            time.sleep(0.02)
        assert "L1 store failed" in gateway.logs()
        assert not any(unique.encode() in (client.get(key) or b"") for key in client.scan_iter("gw:c:*"))
    finally:
        client.config_set("maxmemory", "0")
    time.sleep(1.1)  # the breaker the failure opened (1 s) closes again
    again = ask(gateway, f"What is {unique}?")  # the gateway has one worker: the one that answered first
    assert (again.headers["X-Cache"], again.headers.get("X-Cache-Layer")) == ("HIT", "L0")
    assert again.json() == first.json()
