"""Upstream key health through a real gateway: per-model cooldowns, outlier ejection, credit that ran out."""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from app.upstream.health import EJECT_BASE_SECONDS
from tests.support import Gateway, MockUpstream, base_env, openai_error

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

SUFFIX = uuid.uuid4().hex[:10]
K1, K2 = f"sk-health-k1-{SUFFIX}", f"sk-health-k2-{SUFFIX}"


def chat(model: str = "mock-gpt") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": f"health {uuid.uuid4().hex}"}]}


def post(gw: Gateway, body: dict | None = None) -> requests.Response:
    return requests.post(gw.url + "/v1/chat/completions", json=body or chat(), timeout=30)


@pytest.fixture
def one_key(upstream_server: MockUpstream) -> Iterator[Gateway]:
    """A gateway with one upstream key of its own (cooldowns are shared through Redis per key)."""
    gw = Gateway(base_env(upstream_server, UPSTREAM_API_KEYS=f"sk-health-one-{uuid.uuid4().hex}",
                          CACHE_ENABLED="false", UPSTREAM_MAX_RETRIES="2"))
    yield gw
    gc.collect()
    gw.stop()


@pytest.fixture(scope="module")
def two_keys(upstream_server: MockUpstream) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, UPSTREAM_API_KEYS=f"{K1},{K2}", CACHE_ENABLED="false",
                          UPSTREAM_MAX_RETRIES="3"))
    yield gw
    gc.collect()
    gw.stop()


def test_a_429_on_one_model_leaves_other_models_served(one_key: Gateway, upstream: MockUpstream) -> None:
    """429 Retry-After 30 on gpt-4o: gpt-4o gets 429, mock-gpt on the same key is served at once."""
    upstream.faults({"model": "gpt-4o", "status": 429, "retry_after": 30, "times": -1})
    limited = post(one_key, chat("gpt-4o"))
    assert limited.status_code == 429 and 1 <= int(limited.headers["Retry-After"]) <= 31
    started = time.monotonic()
    other = post(one_key, chat("mock-gpt"))
    assert other.status_code == 200 and time.monotonic() - started < 1.0
    assert [r["body"]["model"] for r in upstream.requests()][-1] == "mock-gpt"
    time.sleep(1.2)  # another worker's view (refreshed from Redis) agrees: gpt-4o rests, mock-gpt does not
    assert post(one_key, chat("gpt-4o")).status_code == 429
    assert post(one_key, chat("deepseek-chat")).status_code == 200


def test_upstream_failures_never_become_429(one_key: Gateway, upstream: MockUpstream) -> None:
    """An only key failing with 500s (and resets) is never benched: clients get the upstream's failure, not a 429,
    and the first request after the upstream recovers is served."""
    upstream.faults({"status": 500, "times": 12})
    statuses = [post(one_key).status_code for _ in range(4)]
    assert statuses == [500] * 4
    upstream.faults({"kind": "reset", "times": 9})
    statuses = [post(one_key).status_code for _ in range(3)]
    assert statuses == [502] * 3
    upstream.reset()
    assert post(one_key).status_code == 200


def test_a_failing_key_is_ejected_and_the_other_serves(two_keys: Gateway, upstream: MockUpstream) -> None:
    """k1 answers 503 on every call: requests are served by k2, and after the ejection k1 is no longer tried."""
    started = time.monotonic()  # the ejection starts after this, so it lasts at least until started + 5 s
    upstream.faults({"key": K1, "status": 503, "times": -1})
    assert all(post(two_keys).status_code == 200 for _ in range(6))
    upstream.reset()
    upstream.faults({"key": K1, "status": 503, "times": -1})
    sent = 0
    while sent < 6 and time.monotonic() - started < EJECT_BASE_SECONDS - 0.5:  # a slow machine sends fewer
        assert post(two_keys).status_code == 200
        sent += 1
    assert sent >= 1
    assert {r["key"] for r in upstream.requests()} == {K2}


def test_insufficient_quota_is_final_and_rests_nothing(one_key: Gateway, upstream: MockUpstream) -> None:
    """A 429 insufficient_quota and DeepSeek's 402 each cost one upstream attempt, reach the client as they are
    with x-should-retry: false, and rest no model: the next request is sent."""
    upstream.faults({"status": 429, "type": "insufficient_quota", "code": "insufficient_quota",
                     "message": "You exceeded your current quota, please check your plan and billing details."})
    response = post(one_key)
    assert response.status_code == 429
    assert openai_error(response)["code"] == "insufficient_quota"
    assert response.headers["x-should-retry"] == "false"
    assert len(upstream.requests()) == 1
    upstream.faults({"status": 402})
    response = post(one_key)
    assert response.status_code == 402 and openai_error(response)["message"] == "Insufficient Balance"
    assert response.headers["x-should-retry"] == "false"
    assert len(upstream.requests()) == 2
    assert post(one_key).status_code == 200
    assert len(upstream.requests()) == 3


def test_a_key_out_of_credit_gives_way_to_one_with_credit(two_keys: Gateway, upstream: MockUpstream) -> None:
    """k1 out of credit (402): the request moves to k2, and later requests go to k2 first."""
    upstream.faults({"key": K1, "status": 402, "times": -1})
    for _ in range(30):
        assert post(two_keys).status_code == 200
        if any(r["key"] == K1 for r in upstream.requests()):
            break
    upstream.reset()
    assert all(post(two_keys).status_code == 200 for _ in range(6))
    assert {r["key"] for r in upstream.requests()} == {K2}


def test_gateway_retries_are_announced(one_key: Gateway, upstream: MockUpstream) -> None:
    """A 503 after the gateway's own retries carries x-should-retry: false; a 400 (not retried) does not."""
    upstream.faults({"status": 503, "times": -1})
    response = post(one_key)
    assert response.status_code == 503 and response.headers["x-should-retry"] == "false"
    assert len(upstream.requests()) == 3  # UPSTREAM_MAX_RETRIES=2
    upstream.reset()
    upstream.faults({"status": 400})
    response = post(one_key)
    assert response.status_code == 400 and "x-should-retry" not in response.headers
