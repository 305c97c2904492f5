"""The cache fails open: a gateway whose redis-server dies keeps answering, and the cache comes back by itself."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests

from tests.support import Gateway, MockUpstream, RedisServer, base_env, openai_error

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

ADMIN_KEY = "admin-redis-down"


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream, own_redis: RedisServer) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, REDIS_URL=own_redis.url, UPSTREAM_MAX_RETRIES="0",
                          ADMIN_API_KEY=ADMIN_KEY))
    yield gw
    gw.stop()


def ask(gw: Gateway, text: str, request_id: str | None = None) -> requests.Response:
    headers = {"X-Request-ID": request_id} if request_id else {}
    body = {"model": "mock-gpt", "messages": [{"role": "user", "content": text}]}
    return requests.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def cache_of(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["X-Cache"]


def test_redis_outage_bypasses_the_cache_and_recovers(gateway: Gateway, own_redis: RedisServer,
                                                      upstream: MockUpstream, unique: str) -> None:
    """Redis dies: 200 BYPASS answers (L0 still answers what it holds), /readyz 503, /healthz 200; Redis back:
    stored and hit again by itself."""
    before = f"Before the outage {unique}"
    assert cache_of(ask(gateway, before)) == "MISS"
    assert cache_of(ask(gateway, before)) == "HIT"

    own_redis.kill()
    try:
        ids = [f"redis-down-{unique}-{i}" for i in range(4)]
        during = [ask(gateway, f"During the outage {unique}", request_id) for request_id in ids[:3]]
        during.append(ask(gateway, before, ids[3]))
        assert [cache_of(r) for r in during] == ["BYPASS"] * 3 + ["HIT"]
        assert during[3].headers["X-Cache-Layer"] == "L0"  # the worker's own copy, within LOCAL_CACHE_OUTAGE_SECONDS
        assert during[3].json()["choices"][0]["message"]["content"] == f"Mock answer to: {before}"
        assert all(r.json()["choices"][0]["message"]["content"].startswith("Mock answer to: ") for r in during)
        assert len(upstream.requests()) == 1 + 3
        assert requests.get(gateway.url + "/readyz", timeout=10).status_code == 503
        assert requests.get(gateway.url + "/healthz", timeout=10).status_code == 200
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        cleared = requests.delete(gateway.url + "/admin/cache", headers=admin, timeout=10)
        assert openai_error(cleared, 503)["code"] == "redis_unavailable"
        stats = requests.get(gateway.url + "/admin/cache/stats", headers=admin, timeout=10)
        assert stats.status_code in (200, 503) and stats.json()  # what it can say, or why not: never a 500
        time.sleep(0.2)  # log lines are written when the response closes
        lines = {line["request_id"]: line for line in gateway.request_lines() if line.get("request_id") in ids}
        assert [lines[i]["cache"] for i in ids] == ["BYPASS"] * 3 + ["L0"]
        assert all(line["status"] == 200 for line in lines.values())
    finally:
        own_redis.start()

    after = f"After the outage {unique}"
    started = time.monotonic()
    while cache_of(ask(gateway, after)) != "MISS":
        assert time.monotonic() - started < 5, "the cache did not come back within 5 s"
        time.sleep(0.1)
    assert cache_of(ask(gateway, after)) == "HIT"
    assert requests.get(gateway.url + "/readyz", timeout=10).status_code == 200


def test_l0_answers_during_an_outage_only_within_its_bound(upstream_server: MockUpstream, own_redis: RedisServer,
                                                           upstream: MockUpstream, unique: str) -> None:
    """LOCAL_CACHE_OUTAGE_SECONDS after its last read of the invalidation counters, a worker that cannot reach
    Redis stops answering from L0: a deletion it cannot see is served at most that long."""
    gw = Gateway(base_env(upstream_server, REDIS_URL=own_redis.url, UPSTREAM_MAX_RETRIES="0",
                          LOCAL_CACHE_OUTAGE_SECONDS="3"))
    try:
        held = f"Held in L0 {unique}"
        assert cache_of(ask(gw, held)) == "MISS"  # the counters are read by this look-up, at the latest
        own_redis.kill()
        assert cache_of(ask(gw, f"Opens the breaker {unique}")) == "BYPASS"  # Redis is skipped from here on
        during = ask(gw, held)
        assert (cache_of(during), during.headers["X-Cache-Layer"]) == ("HIT", "L0")
        time.sleep(3.2)  # past the bound, counted from the first look-up's read
        assert cache_of(ask(gw, held)) == "BYPASS"
        assert len(upstream.requests()) == 3
    finally:
        gw.stop()
        own_redis.start()
