"""Several upstream keys and backends through a real gateway: limited or rejected keys are worked around."""

from __future__ import annotations

import gc
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Gateway, MockUpstream, base_env

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

SUFFIX = uuid.uuid4().hex[:10]
# Keys of this module only: key health is shared through Redis with every gateway using these keys.
K1, K2 = f"sk-up-k1-{SUFFIX}", f"sk-up-k2-{SUFFIX}"
ADMIN = f"admin-{SUFFIX}"
REFRESH = 1.2  # workers re-read the shared key states once a second


def key_id(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


def chat(model: str = "mock-gpt") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": f"keys {uuid.uuid4().hex}"}]}


def post(gw: Gateway, body: dict | None = None) -> requests.Response:
    return requests.post(gw.url + "/v1/chat/completions", json=body or chat(), timeout=30)


def env(upstream: MockUpstream, **extra: str) -> dict[str, str]:
    return base_env(upstream, UPSTREAM_API_KEYS=f"{K1},{K2}", CACHE_ENABLED="false", ADMIN_API_KEY=ADMIN, **extra)


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    gw = Gateway(env(upstream_server), workers=2)
    yield gw
    gc.collect()  # drop finished responses' keep-alive connections, or gunicorn waits GRACEFUL_TIMEOUT
    gw.stop()


@pytest.fixture(scope="module")
def second_gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    """Another gateway process on the same Redis and keys (another pod)."""
    gw = Gateway(env(upstream_server), workers=1)
    yield gw
    gc.collect()
    gw.stop()


def restore(gw: Gateway, secret: str) -> requests.Response:
    return requests.post(f"{gw.url}/admin/upstream-keys/{key_id(secret)}/restore", timeout=10,
                         headers={"Authorization": f"Bearer {ADMIN}"})


@pytest.fixture(autouse=True)
def healthy_keys(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test of the two-key gateway ends with both keys back in service everywhere."""
    yield
    if "gateway" not in request.fixturenames:
        return
    gateway = request.getfixturevalue("gateway")
    for secret in (K1, K2):
        assert restore(gateway, secret).status_code == 200
    time.sleep(REFRESH)


def key_states(gw: Gateway) -> dict[str, float]:
    text = requests.get(gw.metrics_url, timeout=10).text
    assert K1 not in text and K2 not in text
    return {sample.labels["key_id"]: sample.value for family in text_string_to_metric_families(text)
            if family.name == "gateway_upstream_key_state" for sample in family.samples}


def until_key_used(gw: Gateway, upstream: MockUpstream, secret: str, attempts: int = 30) -> list[requests.Response]:
    """Send requests until one reaches `secret` (the choice between idle keys is random)."""
    responses = []
    for _ in range(attempts):
        responses.append(post(gw))
        if any(r["key"] == secret for r in upstream.requests()):
            return responses
    raise AssertionError(f"no request reached {key_id(secret)} in {attempts} tries")


def test_limited_key_is_avoided_without_client_errors(gateway: Gateway, second_gateway: Gateway,
                                                      upstream: MockUpstream) -> None:
    """k1 answers 429 Retry-After 30: every client gets its 200 from k2, in this gateway and the other process."""
    assert post(second_gateway).status_code == 200  # the other process has its own view already
    upstream.reset()
    upstream.faults({"key": K1, "status": 429, "retry_after": 30, "times": -1})
    responses = until_key_used(gateway, upstream, K1)
    assert all(r.status_code == 200 for r in responses)
    log = upstream.requests()
    first_k1 = next(i for i, r in enumerate(log) if r["key"] == K1)
    assert log[first_k1 + 1]["key"] == K2  # the same request moved on to k2 at once
    time.sleep(REFRESH)
    upstream.reset()
    upstream.faults({"key": K1, "status": 429, "retry_after": 30, "times": -1})
    for gw in (gateway, gateway, gateway, gateway, second_gateway, second_gateway, second_gateway):
        assert post(gw).status_code == 200
    assert {r["key"] for r in upstream.requests()} == {K2}
    states = key_states(gateway)
    assert states[key_id(K1)] == 1 and states[key_id(K2)] == 0


def test_all_keys_limited_is_a_429_with_retry_after(gateway: Gateway, upstream: MockUpstream) -> None:
    """Both keys limited: the client gets 429 and a Retry-After, now and on the next request."""
    upstream.faults({"status": 429, "retry_after": 30, "times": -1})
    for _ in range(2):
        response = post(gateway)
        assert response.status_code == 429
        assert 1 <= int(response.headers["Retry-After"]) <= 31
        assert response.json()["error"]["message"]


def test_rejected_key_is_taken_out_until_restored(gateway: Gateway, upstream: MockUpstream) -> None:
    """k1 answers 401: clients never notice, k1 is out (logged by key_id, state 2) until the admin restores it."""
    upstream.faults({"key": K1, "status": 401, "times": -1})
    assert all(r.status_code == 200 for r in until_key_used(gateway, upstream, K1))
    time.sleep(REFRESH)
    upstream.reset()
    assert all(post(gateway).status_code == 200 for _ in range(6))
    assert {r["key"] for r in upstream.requests()} == {K2}
    errors = [line for line in gateway.log_lines()
              if line.get("level") == "ERROR" and line.get("upstream_key_id") == key_id(K1)]
    assert errors and key_id(K1) in errors[0]["message"]
    logs = gateway.logs()
    assert K1 not in logs and K2 not in logs
    assert key_states(gateway)[key_id(K1)] == 2

    restored = restore(gateway, K1)
    assert restored.status_code == 200 and restored.json()["state"] == "ok"
    time.sleep(REFRESH)
    upstream.reset()
    until_key_used(gateway, upstream, K1)
    assert key_states(gateway)[key_id(K1)] == 0


def test_restore_needs_the_admin_key_and_a_known_key_id(gateway: Gateway) -> None:
    """Restore without the admin key is 401; an unknown key id is 404."""
    url = f"{gateway.url}/admin/upstream-keys/{key_id(K1)}/restore"
    assert requests.post(url, timeout=10).status_code == 401
    unknown = requests.post(f"{gateway.url}/admin/upstream-keys/ffffffff/restore", timeout=10,
                            headers={"Authorization": f"Bearer {ADMIN}"})
    assert unknown.status_code == 404


def test_models_list_rejected_upstream_is_a_502_without_the_upstream_body(gateway: Gateway,
                                                                           upstream: MockUpstream) -> None:
    """GET /v1/models answered 401 (quoting a key's tail): the client gets the gateway's 502, never that body."""
    upstream.faults({"status": 401, "paths": ["/v1/models"], "times": -1,
                     "message": "Incorrect API key provided: sk-up-k***abcd. You can find your API key at ..."})
    response = requests.get(gateway.url + "/v1/models", timeout=30)
    assert response.status_code == 502
    body = response.json()
    assert body["error"]["code"] == "upstream_auth_failed"
    assert "abcd" not in response.text and "Incorrect API key" not in response.text
    assert {r["key"] for r in upstream.requests()} == {K1, K2}  # both keys tried, both taken out
    time.sleep(REFRESH)
    states = key_states(gateway)
    assert states[key_id(K1)] == 2 and states[key_id(K2)] == 2


def test_models_list_forbidden_keeps_the_keys_and_hides_the_body(gateway: Gateway, upstream: MockUpstream) -> None:
    """GET /v1/models answered 403 (a key restricted to inference): 502 without the upstream's body, and the
    keys stay in rotation, so chat requests still go through."""
    upstream.faults({"status": 403, "paths": ["/v1/models"], "times": -1,
                     "message": "Insufficient permissions for key sk-up-k***abcd"})
    response = requests.get(gateway.url + "/v1/models", timeout=30)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_forbidden"
    assert "abcd" not in response.text and "Insufficient permissions" not in response.text
    time.sleep(REFRESH)
    assert set(key_states(gateway).values()) == {0}
    chat = requests.post(gateway.url + "/v1/chat/completions", timeout=30,
                         json={"model": "mock-gpt", "messages": [{"role": "user", "content": "still served?"}]})
    assert chat.status_code == 200


def test_models_list_with_every_key_limited_is_a_429_with_retry_after(gateway: Gateway,
                                                                     upstream: MockUpstream) -> None:
    """GET /v1/models answered 429 on every key: the client gets 429 with Retry-After, as for a POST."""
    upstream.faults({"status": 429, "retry_after": 30, "paths": ["/v1/models"], "times": -1})
    response = requests.get(gateway.url + "/v1/models", timeout=30)
    assert response.status_code == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 31


def test_bad_backends_file_stops_the_gateway_at_start(upstream_server: MockUpstream, tmp_path: Path) -> None:
    """A backend with weight 0 stops gunicorn at start with a message naming the file, backend and field."""
    path = tmp_path / "upstreams.yaml"
    path.write_text(json.dumps({"backends": [{"name": "zero", "url": upstream_server.url, "weight": 0}]}))
    with pytest.raises(TimeoutError) as info:
        Gateway(base_env(upstream_server, UPSTREAMS_FILE=str(path), UPSTREAM_API_KEYS=""), timeout=30)
    message = str(info.value)
    assert "gunicorn exited" in message or "did not start" in message
    assert f"G-AIGateway cannot start: UPSTREAMS_FILE {path}: backends[0] ('zero'): 'weight'" in message
    assert "Worker failed to boot" in message


@pytest.fixture(scope="module")
def other_upstream() -> Iterator[MockUpstream]:
    server = MockUpstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def multi_gateway(upstream_server: MockUpstream, other_upstream: MockUpstream,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    path = Path(tmp_path_factory.mktemp("upstreams")) / "upstreams.yaml"
    path.write_text(json.dumps({"backends": [
        {"name": "alpha", "url": upstream_server.url, "keys": [f"sk-alpha-{SUFFIX}"],
         "models": ["mock-gpt"], "model_map": {"house-model": "deepseek-chat"}},
        {"name": "beta", "url": other_upstream.url, "keys": [f"sk-beta-{SUFFIX}"], "models": ["gpt-4o"]},
    ]}))
    gw = Gateway(base_env(upstream_server, UPSTREAMS_FILE=str(path), UPSTREAM_API_KEYS="", CACHE_ENABLED="false"))
    yield gw
    gc.collect()
    gw.stop()


def test_requests_route_by_model(multi_gateway: Gateway, upstream: MockUpstream,
                                 other_upstream: MockUpstream) -> None:
    """UPSTREAMS_FILE: each model goes to its backend, with its key; a mapped name reaches the upstream."""
    other_upstream.reset()
    assert post(multi_gateway, chat("gpt-4o")).status_code == 200
    assert post(multi_gateway, chat("mock-gpt")).status_code == 200
    assert post(multi_gateway, chat("house-model")).status_code == 200
    alpha, beta = upstream.requests(), other_upstream.requests()
    assert [(r["key"], r["body"]["model"]) for r in beta] == [(f"sk-beta-{SUFFIX}", "gpt-4o")]
    assert [(r["key"], r["body"]["model"]) for r in alpha] == [
        (f"sk-alpha-{SUFFIX}", "mock-gpt"), (f"sk-alpha-{SUFFIX}", "deepseek-chat")]


def test_unknown_model_is_404(multi_gateway: Gateway, upstream: MockUpstream, other_upstream: MockUpstream) -> None:
    """A model no backend serves: 404 model_not_found, nothing sent upstream."""
    other_upstream.reset()
    response = post(multi_gateway, chat("no-such-model"))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert upstream.requests() == [] and other_upstream.requests() == []


def test_models_lists_the_configured_models(multi_gateway: Gateway) -> None:
    """GET /v1/models: the models the backends file names, in OpenAI's list shape."""
    body = requests.get(multi_gateway.url + "/v1/models", timeout=10).json()
    assert body["object"] == "list"
    assert sorted(m["id"] for m in body["data"]) == ["gpt-4o", "house-model", "mock-gpt"]
