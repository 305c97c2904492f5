"""Upstream failures through a real gateway: retries, Retry-After, pass-through errors, 502 and 504."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from tests.support import ClosedPort, Gateway, MockUpstream, base_env, openai_error

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module")
def upstream_key() -> str:
    # A key of its own: key cooldowns are shared through Redis, and must not reach other modules' gateways.
    return f"sk-retries-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream, upstream_key: str) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, UPSTREAM_API_KEYS=upstream_key, UPSTREAM_MAX_RETRIES="2",
                          UPSTREAM_READ_TIMEOUT="0.5", CACHE_ENABLED="false"))
    yield gw
    gw.stop()


def post(gw: Gateway, body: dict | None = None, **kwargs: object) -> requests.Response:
    return requests.post(gw.url + "/v1/chat/completions", json=body or CHAT, timeout=30, **kwargs)


def test_429_with_retry_after_is_retried_after_the_wait(gateway: Gateway, upstream: MockUpstream) -> None:
    """A 429 with Retry-After: 1 is retried after about a second and the client gets the 200."""
    upstream.faults({"status": 429, "retry_after": 1})
    started = time.monotonic()
    response = post(gateway)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Mock answer to: hello"
    assert elapsed >= 0.95
    assert len(upstream.requests()) == 2


def test_503_twice_then_200(gateway: Gateway, upstream: MockUpstream) -> None:
    """Two 503s are retried and the third attempt's 200 reaches the client."""
    upstream.faults({"status": 503, "times": 2})
    response = post(gateway)
    assert response.status_code == 200
    assert len(upstream.requests()) == 3


def test_persistent_500_is_passed_on_after_the_retries(gateway: Gateway, upstream: MockUpstream) -> None:
    """An upstream failing every time: UPSTREAM_MAX_RETRIES retries, then its own 500 and body, logged."""
    upstream.faults({"status": 500, "times": -1, "message": "upstream is on fire"})
    request_id = f"retries-{uuid.uuid4().hex}"
    response = post(gateway, headers={"X-Request-ID": request_id})
    assert response.status_code == 500
    assert openai_error(response)["message"] == "upstream is on fire"
    assert len(upstream.requests()) == 3
    time.sleep(0.2)  # the log line is written when the response closes
    (line,) = [line for line in gateway.request_lines() if line["request_id"] == request_id]
    assert line["retries"] == 2
    assert line["status"] == 500


def test_upstream_400_is_passed_through(gateway: Gateway, upstream: MockUpstream) -> None:
    """An upstream 4xx is not retried and reaches the client with its status and body."""
    upstream.faults({"status": 400, "message": "context too long", "code": "context_length_exceeded"})
    response = post(gateway)
    assert response.status_code == 400
    error = openai_error(response)
    assert error["message"] == "context too long"
    assert error["code"] == "context_length_exceeded"
    assert len(upstream.requests()) == 1


def test_upstream_garbage_is_502(gateway: Gateway, upstream: MockUpstream) -> None:
    """A 200 whose body is not JSON is a 502 OpenAI-style error, not the garbage."""
    upstream.faults({"kind": "garbage"})
    response = post(gateway)
    assert response.status_code == 502
    assert openai_error(response)["type"] == "upstream_error"
    assert "not json" not in response.text


def test_upstream_slower_than_read_timeout_is_504(gateway: Gateway, upstream: MockUpstream) -> None:
    """An upstream silent for longer than UPSTREAM_READ_TIMEOUT is a 504, without another attempt."""
    upstream.faults({"kind": "delay", "seconds": 2})
    started = time.monotonic()
    response = post(gateway)
    assert response.status_code == 504
    assert openai_error(response)["code"] == "upstream_timeout"
    assert time.monotonic() - started < 1.8
    assert len(upstream.requests()) == 1


def test_upstream_key_is_sent_and_client_authorization_is_not(
    gateway: Gateway, upstream: MockUpstream, upstream_key: str
) -> None:
    """The upstream sees the gateway's key as Bearer, never the client's Authorization."""
    response = post(gateway, headers={"Authorization": "Bearer client-key-must-stay-here"})
    assert response.status_code == 200
    (seen,) = upstream.requests()
    assert seen["key"] == upstream_key
    assert seen["headers"]["authorization"] == f"Bearer {upstream_key}"
    assert "client-key-must-stay-here" not in str(seen)


@pytest.fixture(scope="module")
def unreachable_gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    closed = ClosedPort()
    gw = Gateway(base_env(upstream_server, TARGET_URL=closed.url,
                          UPSTREAM_API_KEYS=f"sk-unreachable-{uuid.uuid4().hex}", UPSTREAM_MAX_RETRIES="1",
                          CACHE_ENABLED="false"))
    yield gw
    gw.stop()
    closed.close()


def test_unreachable_upstream_is_502(unreachable_gateway: Gateway) -> None:
    """TARGET_URL pointing at a closed port gives a 502 OpenAI-style error."""
    response = post(unreachable_gateway)
    assert response.status_code == 502
    assert openai_error(response)["code"] == "upstream_unreachable"
