"""Keys never leak: not in the gateway's logs, not in anything a client receives, not in start-up errors."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from app.upstream.backends import key_fingerprint
from app.upstream.health import KeyHealth
from tests.support import GUNICORN, REDIS_URL, ROOT, ClosedPort, Gateway, MockUpstream, base_env, free_port

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

UPSTREAM_KEY = f"sk-secret-{uuid.uuid4().hex}"
CLIENT_KEY = f"ck-secret-{uuid.uuid4().hex}"
CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "secret test"}]}


def leaks(secret: str, text: str) -> bool:
    """Whether any 12 characters of the secret's random part show (PyYAML and friends quote keys cut short)."""
    random_part = secret.rsplit("-", 1)[1]
    return any(random_part[i:i + 12] in text for i in range(len(random_part) - 11))


class Seen:
    """Everything the clients of this module received: statuses, headers and bodies."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def add(self, response: requests.Response) -> requests.Response:
        self.texts.append(f"{response.status_code} {dict(response.headers)!r} {response.text}")
        return response


@pytest.fixture(scope="module")
def seen() -> Seen:
    return Seen()


def secret_env(upstream: MockUpstream, **extra: str) -> dict[str, str]:
    return base_env(upstream, UPSTREAM_API_KEYS=UPSTREAM_KEY, GATEWAY_API_KEYS=f"tenant-a:{CLIENT_KEY}",
                    AUTH_DISABLED="", LOG_LEVEL="DEBUG", UPSTREAM_MAX_RETRIES="1", CACHE_ENABLED="false", **extra)


@pytest.fixture(scope="module")
def gateways(upstream_server: MockUpstream, redis_conn: redis.Redis) -> Iterator[list[Gateway]]:
    closed = ClosedPort()
    started = [Gateway(secret_env(upstream_server))]
    try:
        started.append(Gateway(secret_env(upstream_server, TARGET_URL=closed.url)))
        yield started
    finally:
        for gw in started:
            gw.stop()
        closed.close()
        redis_conn.hdel(KeyHealth.REDIS_KEY, key_fingerprint(UPSTREAM_KEY))  # the 401 took it out of rotation


def auth(key: str = CLIENT_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_requests_of_every_kind_are_answered(gateways: list[Gateway], upstream: MockUpstream, seen: Seen) -> None:
    """Successes and failures of every kind, collected for the leak checks below."""
    gw, unreachable = gateways
    url = gw.url + "/v1/chat/completions"

    def post(body: dict = CHAT, headers: dict | None = None, target: str = url) -> requests.Response:
        return seen.add(requests.post(target, json=body, headers=headers if headers is not None else auth(),
                                      timeout=30))

    assert post().status_code == 200
    assert post(headers={}).status_code == 401
    assert post(headers=auth(CLIENT_KEY + "x")).status_code == 401
    assert post(headers=auth(CLIENT_KEY[:-1])).status_code == 401
    assert post(headers={"Authorization": f"Basic {CLIENT_KEY}"}).status_code == 401
    assert post(body={"model": 1}).status_code == 400
    assert post({**CHAT, "stream": True}).status_code == 200
    assert seen.add(requests.get(gw.url + "/v1/models", headers=auth(), timeout=10)).status_code == 200
    assert seen.add(requests.post(gw.url + "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"},
                                  headers=auth(), timeout=10)).status_code == 200
    upstream.faults({"status": 500, "times": 2})
    assert post().status_code == 500
    upstream.faults({"kind": "reset", "after_chunks": 2})
    assert post({**CHAT, "stream": True}).status_code == 200
    upstream.faults({"status": 400})
    assert post().status_code == 400
    assert post(target=unreachable.url + "/v1/chat/completions").status_code == 502
    upstream.faults({"status": 429, "retry_after": 1, "times": 2})  # still limited after the retry: passed on
    assert post().status_code == 429
    time.sleep(1.1)  # the key's 1 s cooldown
    upstream.faults({"status": 401, "message": f"Incorrect API key provided: {UPSTREAM_KEY}"})
    assert post().status_code == 502  # the upstream refused our key: our own error, without the key
    assert post().status_code == 503  # the only key is out of rotation until an operator restores it
    assert seen.add(requests.get(gw.metrics_url, timeout=10)).status_code == 200


def test_no_key_in_logs_or_responses(gateways: list[Gateway], seen: Seen) -> None:
    """Neither the upstream key nor the client key appears in any log line or anything a client received."""
    assert len(seen.texts) >= 15
    logs = "\n".join(gw.logs() for gw in gateways)
    assert '"level": "DEBUG"' in logs or '"level": "INFO"' in logs  # the logs were written
    assert '"status": 401' in logs and '"status": 502' in logs
    for secret in (UPSTREAM_KEY, CLIENT_KEY):
        assert not leaks(secret, logs)
        assert not [text for text in seen.texts if leaks(secret, text)]
    assert key_fingerprint(UPSTREAM_KEY) in logs  # the key's id is how operators tell keys apart


def start_failing(extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "REDIS_URL": REDIS_URL,
           "AUTH_DISABLED": "true", "WEB_CONCURRENCY": "1", **extra_env}
    return subprocess.run([GUNICORN, "-c", str(ROOT / "gunicorn.conf.py"), "-b", f"127.0.0.1:{free_port()}",
                           "wsgi:app"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)


def test_bad_setting_stops_gunicorn_naming_the_variable() -> None:
    """UPSTREAM_MAX_RETRIES=lots: gunicorn exits non-zero at once with a message naming the variable."""
    result = start_failing({"UPSTREAM_MAX_RETRIES": "lots"})
    assert result.returncode != 0
    assert "UPSTREAM_MAX_RETRIES" in result.stdout + result.stderr


def test_bad_secret_setting_never_echoes_its_value() -> None:
    """A bad secret-named setting is named in the start-up error; its value is not printed."""
    value = f"/nonexistent/{CLIENT_KEY}"
    result = start_failing({"GATEWAY_KEYS_FILE": value, "UPSTREAM_API_KEYS": UPSTREAM_KEY})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "GATEWAY_KEYS_FILE" in output
    assert not leaks(CLIENT_KEY, output) and not leaks(UPSTREAM_KEY, output)


def test_broken_upstreams_file_never_echoes_a_key(tmp_path: Path) -> None:
    """A YAML error in UPSTREAMS_FILE on a line holding a key stops start-up without printing the key."""
    path = tmp_path / "upstreams.yaml"
    path.write_text(f'backends:\n  - url: http://127.0.0.1:9\n    keys: ["{UPSTREAM_KEY}\n')
    result = start_failing({"UPSTREAMS_FILE": str(path)})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "UPSTREAMS_FILE" in output
    assert not leaks(UPSTREAM_KEY, output)


def test_broken_keys_file_never_echoes_a_key(tmp_path: Path) -> None:
    """A YAML error in GATEWAY_KEYS_FILE on a line holding a client key stops start-up without printing it."""
    path = tmp_path / "keys.yaml"
    path.write_text(f'tenants:\n  - name: a\n    keys: ["{CLIENT_KEY}\n')
    result = start_failing({"GATEWAY_KEYS_FILE": str(path), "AUTH_DISABLED": ""})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "GATEWAY_KEYS_FILE" in output
    assert not leaks(CLIENT_KEY, output)
