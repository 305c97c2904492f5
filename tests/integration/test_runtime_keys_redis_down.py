"""Keys at run time with Redis down (issue 14, acceptance 3): static keys work, run-time keys are refused with a
clear 503 (fail closed), nothing is let in; with Redis back, run-time keys work again by themselves."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from tests.support import Gateway, MockUpstream, RedisServer, base_env, openai_error

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

ADMIN_KEY = f"admin-{uuid.uuid4().hex}"
STATIC_KEY = f"sk-static-{uuid.uuid4().hex}"
ROUNDS = 6  # per key, on fresh connections, so both workers answer


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream, own_redis: RedisServer) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, AUTH_DISABLED="", REDIS_URL=own_redis.url, ADMIN_API_KEY=ADMIN_KEY,
                          GATEWAY_API_KEYS=f"static-team:{STATIC_KEY}", CACHE_ENABLED="false",
                          UPSTREAM_MAX_RETRIES="0"), workers=2)
    yield gw
    gw.stop()


def chat(gw: Gateway, key: str, text: str) -> requests.Response:
    body = {"model": "mock-gpt", "messages": [{"role": "user", "content": text}]}
    return requests.post(gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                         timeout=10)


def admin(gw: Gateway, method: str, path: str, body: object = None) -> requests.Response:
    return requests.request(method, gw.url + path, json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                            timeout=10)


def test_redis_down_static_keys_work_runtime_keys_503(gateway: Gateway, own_redis: RedisServer,
                                                       upstream: MockUpstream, unique: str) -> None:
    """Redis killed: the static key answers 200; a live, a revoked and a never-issued run-time key all 503
    `key_store_unavailable`; nothing but the static key's requests reaches the upstream; Redis back: works again."""
    live = admin(gateway, "POST", "/admin/keys", {"tenant": f"live-{unique}"}).json()
    revoked = admin(gateway, "POST", "/admin/keys", {"tenant": f"gone-{unique}"}).json()
    for created in (live, revoked):
        assert all(chat(gateway, created["key"], "before").status_code == 200 for _ in range(ROUNDS))
    assert admin(gateway, "DELETE", f"/admin/keys/{revoked['id']}").status_code == 200
    time.sleep(1.0)  # past the workers' 0.5 s memory of the key
    assert chat(gateway, revoked["key"], "before").status_code == 401

    own_redis.kill()
    time.sleep(1.0)  # whatever a worker remembered of a run-time key has lapsed
    upstream.reset()
    text = f"during the outage {unique}"
    for _ in range(ROUNDS):
        assert chat(gateway, STATIC_KEY, text).status_code == 200
        for key in (live["key"], revoked["key"], "sk-gwr-never-issued-" + unique):
            error = openai_error(chat(gateway, key, text), 503)
            assert error["code"] == "key_store_unavailable" and "retry" in error["message"]
        assert openai_error(chat(gateway, "sk-garbage-" + unique, text), 401)["code"] == "invalid_api_key"
    assert len(upstream.requests()) == ROUNDS  # the static key's, and nothing else
    refused = admin(gateway, "POST", "/admin/keys", {"tenant": f"new-{unique}"})
    assert openai_error(refused, 503)["code"] == "redis_unavailable"
    statuses = [line["status"] for line in gateway.request_lines() if line.get("path") == "/v1/chat/completions"]
    assert 503 in statuses and 500 not in statuses

    own_redis.start()  # an empty Redis (memory only): the keys issued before are gone with it
    started = time.monotonic()
    while True:
        created = admin(gateway, "POST", "/admin/keys", {"tenant": f"after-{unique}"})
        if created.status_code == 201 and chat(gateway, created.json()["key"], "after").status_code == 200:
            break
        assert time.monotonic() - started < 10, "run-time keys did not come back within 10 s of Redis"
        time.sleep(0.2)
    key = created.json()["key"]
    deadline = time.monotonic() + 10
    while not all(chat(gateway, key, "after").status_code == 200 for _ in range(ROUNDS)):
        assert time.monotonic() < deadline, "a worker's breaker stayed open"
        time.sleep(0.2)
    assert chat(gateway, live["key"], "after").status_code == 401
