"""Client authentication through a real gateway: 401s, tenants in the log, the keys file, refusing to run open."""

from __future__ import annotations

import gc
import hashlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support import GUNICORN, ROOT, Gateway, MockUpstream, base_env, free_port, openai_error

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

SUFFIX = uuid.uuid4().hex[:10]
ACME_KEY = f"sk-acme-{SUFFIX}"
BARE_KEY = f"sk-bare-{SUFFIX}"
FILE_KEY = f"sk-file-{SUFFIX}"
HASHED_KEY = f"sk-hashed-{SUFFIX}"
UPSTREAM_KEY = f"sk-upstream-auth-{SUFFIX}"
ACME = f"acme-{SUFFIX}"
TEAM = f"team-{SUFFIX}"
HASHED = f"hashed-{SUFFIX}"


def chat(model: str = "mock-gpt", content: str = "hello") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}]}


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    keys_file = tmp_path_factory.mktemp("auth") / "keys.yaml"
    keys_file.write_text(f"""
tenants:
  - name: {TEAM}
    keys: [{FILE_KEY}]
    models: [mock-gpt, gpt-4o]
    model_limits:
      gpt-4o: {{rpm: 2}}
  - name: {HASHED}
    key_sha256: ["{hashlib.sha256(HASHED_KEY.encode()).hexdigest()}"]
""")
    env = base_env(upstream_server, AUTH_DISABLED="", UPSTREAM_API_KEYS=UPSTREAM_KEY, CACHE_ENABLED="false",
                   GATEWAY_API_KEYS=f"{ACME}:{ACME_KEY},{BARE_KEY}", GATEWAY_KEYS_FILE=str(keys_file),
                   RATE_LIMIT_BURST="1")  # the model limit is counted from idle: a whole window at once
    gw = Gateway(env, workers=2)
    yield gw
    gc.collect()  # drop finished responses' keep-alive connections, or gunicorn waits GRACEFUL_TIMEOUT
    gw.stop()


def post(gw: Gateway, key: str | None, body: dict | None = None, **headers: str) -> requests.Response:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return requests.post(gw.url + "/v1/chat/completions", json=body or chat(), headers=headers, timeout=30)


def log_line(gw: Gateway, request_id: str) -> dict:
    for _ in range(40):  # the line is written when the response closes
        lines = [line for line in gw.request_lines() if line.get("request_id") == request_id]
        if lines:
            return lines[0]
        time.sleep(0.05)
    raise AssertionError(f"no log line for {request_id}")


def test_missing_key_is_401(gateway: Gateway, upstream: MockUpstream) -> None:
    """No Authorization header: 401 with an OpenAI-style invalid_api_key error, upstream untouched."""
    response = post(gateway, None)
    assert response.status_code == 401
    assert openai_error(response)["code"] == "invalid_api_key"
    assert upstream.requests() == []


def test_wrong_key_is_401(gateway: Gateway, upstream: MockUpstream) -> None:
    """An unknown key: 401, never forwarded."""
    response = post(gateway, "sk-not-a-key")
    assert response.status_code == 401
    assert openai_error(response)["type"] == "invalid_request_error"
    assert upstream.requests() == []


def test_openai_sdk_sees_an_authentication_error(gateway: Gateway) -> None:
    """The openai SDK raises its AuthenticationError for a bad key, like against OpenAI."""
    import openai

    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "hi"}])
    client.close()


def test_good_key_is_served_and_logged_with_its_tenant(gateway: Gateway, upstream: MockUpstream) -> None:
    """A configured key gets the answer; the log line names the tenant (not the key)."""
    request_id = f"auth-{uuid.uuid4().hex}"
    response = post(gateway, ACME_KEY, **{"X-Request-ID": request_id})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Mock answer to: hello"
    line = log_line(gateway, request_id)
    assert line["tenant"] == ACME
    assert ACME_KEY not in gateway.logs()


def test_client_key_is_never_forwarded(gateway: Gateway, upstream: MockUpstream) -> None:
    """The upstream sees the gateway's upstream key only, never the client's."""
    assert post(gateway, ACME_KEY).status_code == 200
    (seen,) = upstream.requests()
    assert seen["key"] == UPSTREAM_KEY
    assert ACME_KEY not in repr(seen)


def test_bare_key_tenant_is_its_fingerprint(gateway: Gateway, upstream: MockUpstream) -> None:
    """A key without `tenant:` is logged under `key-` + 8 hex digits of its SHA-256."""
    request_id = f"auth-{uuid.uuid4().hex}"
    assert post(gateway, BARE_KEY, **{"X-Request-ID": request_id}).status_code == 200
    assert log_line(gateway, request_id)["tenant"] == "key-" + hashlib.sha256(BARE_KEY.encode()).hexdigest()[:8]


def test_keys_file_tenant_and_hashed_key(gateway: Gateway, upstream: MockUpstream) -> None:
    """Keys from GATEWAY_KEYS_FILE work, as plain keys and as key_sha256 digests."""
    first, second = f"auth-{uuid.uuid4().hex}", f"auth-{uuid.uuid4().hex}"
    assert post(gateway, FILE_KEY, **{"X-Request-ID": first}).status_code == 200
    assert post(gateway, HASHED_KEY, **{"X-Request-ID": second}).status_code == 200
    assert log_line(gateway, first)["tenant"] == TEAM
    assert log_line(gateway, second)["tenant"] == HASHED


def test_model_outside_the_tenants_list_is_403(gateway: Gateway, upstream: MockUpstream) -> None:
    """A tenant limited to some models gets 403 model_not_allowed for another, and nothing goes upstream."""
    response = post(gateway, FILE_KEY, chat("deepseek-chat"))
    assert response.status_code == 403
    assert openai_error(response)["code"] == "model_not_allowed"
    assert upstream.requests() == []
    assert post(gateway, HASHED_KEY, chat("deepseek-chat")).status_code == 200  # no list: any model


def test_model_limits_apply_to_that_model_only(gateway: Gateway, upstream: MockUpstream) -> None:
    """model_limits gpt-4o rpm 2: the third gpt-4o request is 429, mock-gpt still passes."""
    statuses = [post(gateway, FILE_KEY, chat("gpt-4o", f"m{i}")).status_code for i in range(3)]
    assert statuses == [200, 200, 429]
    assert post(gateway, FILE_KEY, chat("mock-gpt")).status_code == 200


def test_no_client_keys_refuses_to_start(upstream_server: MockUpstream, tmp_path: Path) -> None:
    """No GATEWAY_API_KEYS and AUTH_DISABLED unset: gunicorn exits non-zero with a message naming the setting."""
    env = {
        "PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "PYTHONUNBUFFERED": "1",
        "TARGET_URL": upstream_server.url, "UPSTREAM_API_KEYS": UPSTREAM_KEY, "WEB_CONCURRENCY": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"), "SEMANTIC_CACHE_ENABLED": "false",
    }
    process = subprocess.run(
        [GUNICORN, "-c", str(ROOT / "gunicorn.conf.py"), "-b", f"127.0.0.1:{free_port()}", "wsgi:app"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert process.returncode != 0
    output = process.stdout + process.stderr
    assert "GATEWAY_API_KEYS" in output and "AUTH_DISABLED" in output
