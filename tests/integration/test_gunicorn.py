"""The gateway under gunicorn's gevent workers: clean start, liveness and readiness."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import requests

from tests.support import ClosedPort, Gateway, MockUpstream, base_env

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, UPSTREAM_API_KEYS=f"sk-gunicorn-{uuid.uuid4().hex}"), workers=2)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def redis_down_gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    closed = ClosedPort()
    gw = Gateway(base_env(upstream_server, UPSTREAM_API_KEYS=f"sk-no-redis-{uuid.uuid4().hex}",
                          REDIS_URL=f"redis://127.0.0.1:{closed.port}/0"))
    yield gw
    gw.stop()
    closed.close()


def test_no_monkey_patch_warning(gateway: Gateway) -> None:
    """Two gevent workers start and serve without gunicorn's output showing a MonkeyPatchWarning."""
    for _ in range(4):
        assert requests.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
    logs = gateway.logs()
    assert "Booting worker" in logs
    assert "MonkeyPatchWarning" not in logs
    assert "Traceback" not in logs


def test_healthz_is_200(gateway: Gateway) -> None:
    """/healthz answers 200 JSON while the process runs."""
    response = requests.get(gateway.url + "/healthz", timeout=5)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_readyz_is_200_with_redis_up(gateway: Gateway) -> None:
    """/readyz answers 200 when Redis answers."""
    response = requests.get(gateway.url + "/readyz", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"


def test_readyz_is_503_with_a_reason_when_redis_is_down(redis_down_gateway: Gateway) -> None:
    """With REDIS_URL at a closed port /readyz is 503 and says why; /healthz stays 200."""
    response = requests.get(redis_down_gateway.url + "/readyz", timeout=5)
    assert response.status_code == 503
    assert "redis" in response.json()["reason"].lower()
    assert requests.get(redis_down_gateway.url + "/healthz", timeout=5).status_code == 200


def test_pass_through_works_without_redis(redis_down_gateway: Gateway, upstream: MockUpstream) -> None:
    """Redis down: chat requests still reach the upstream and come back 200 (the cache fails open)."""
    for stream in (False, True):
        response = requests.post(redis_down_gateway.url + "/v1/chat/completions", json={**CHAT, "stream": stream},
                                 timeout=10)
        assert response.status_code == 200
        assert "hello" in response.text
    assert len(upstream.requests()) == 2


def test_bad_server_settings_stop_the_start_naming_every_one(upstream_server: MockUpstream) -> None:
    """Two bad gunicorn-level integers: gunicorn does not start, and one message names both variables.

    (WEB_CONCURRENCY is parsed by gunicorn itself when it is imported, before this config: a bad value there
    ends in gunicorn's own ValueError.)
    """
    with pytest.raises(TimeoutError) as info:
        Gateway(base_env(upstream_server, PORT="eighty", GRACEFUL_TIMEOUT="soon"), timeout=20)
    message = str(info.value)
    assert "G-AIGateway cannot start" in message
    assert "PORT='eighty'" in message and "GRACEFUL_TIMEOUT='soon'" in message
