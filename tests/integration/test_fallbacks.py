"""Fallback chains through a real gateway: which failures move to the next model, what the client and the log
see, the deadline, streams that broke midway, and the cache keeping a fallback answer away from the model asked."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support import ClosedPort, Gateway, MockUpstream, base_env

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

SUFFIX = uuid.uuid4().hex[:10]
PLAIN_KEY, OWN_KEY, LIMITED_KEY = (f"sk-gw-fb-{name}-{SUFFIX}" for name in ("plain", "own", "limited"))


def upstreams_yaml(mock: MockUpstream, closed: ClosedPort) -> str:
    """a and ctx on the mock; b on a port nothing answers; c and long on the mock under the provider's names."""
    return f"""
backends:
  - name: a
    url: {mock.url}
    keys: [sk-up-a-{uuid.uuid4().hex}]
    models: [fb-a, fb-ctx, fb-plain]
  - name: b
    url: {closed.url}
    keys: [sk-up-b-{uuid.uuid4().hex}]
    models: [fb-b]
  - name: c
    url: {mock.url}
    keys: [sk-up-c-{uuid.uuid4().hex}]
    models: [fb-c, fb-long]
    model_map: {{fb-c: deepseek-chat, fb-long: gpt-4o}}
fallbacks:
  fb-a: [fb-b, fb-c]
  fb-ctx: [fb-c]
context_window_fallbacks:
  fb-ctx: [fb-long]
"""


def keys_yaml() -> str:
    return f"""
tenants:
  - name: fb-plain-{SUFFIX}
    keys: [{PLAIN_KEY}]
  - name: fb-own-{SUFFIX}
    keys: [{OWN_KEY}]
    fallbacks: {{fb-a: [fb-c]}}
  - name: fb-limited-{SUFFIX}
    keys: [{LIMITED_KEY}]
    model_limits: {{fb-c: {{rpm: 1}}}}
"""


@pytest.fixture(scope="module")
def chain_files(upstream_server: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    closed = ClosedPort()
    directory = tmp_path_factory.mktemp("fallbacks")
    upstreams, keys = directory / "upstreams.yaml", directory / "keys.yaml"
    upstreams.write_text(upstreams_yaml(upstream_server, closed))
    keys.write_text(keys_yaml())
    yield upstreams, keys
    closed.close()


@pytest.fixture(scope="module")
def gw(upstream_server: MockUpstream, chain_files: tuple[Path, Path]) -> Iterator[Gateway]:
    upstreams, keys = chain_files
    gateway = Gateway(base_env(upstream_server, UPSTREAMS_FILE=str(upstreams), GATEWAY_KEYS_FILE=str(keys),
                               AUTH_DISABLED="false", FALLBACK_DEADLINE_SECONDS="20", UPSTREAM_MAX_RETRIES="2"))
    yield gateway
    gateway.stop()


def chat(model: str, *, stream: bool = False, text: str | None = None) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": text or f"fallback {uuid.uuid4().hex}"}]}
    if stream:
        body["stream"] = True
    return body


def post(gw: Gateway, body: dict, key: str = PLAIN_KEY, **headers: str) -> requests.Response:
    return requests.post(gw.url + "/v1/chat/completions", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {key}", **headers})


def line_of(gw: Gateway, response: requests.Response) -> dict:
    request_id = response.headers["X-Request-ID"]
    for _ in range(50):
        lines = [line for line in gw.request_lines() if line.get("request_id") == request_id]
        if lines:
            return lines[0]
        time.sleep(0.05)
    raise AssertionError(f"no log line for {request_id}")


def sent_models(upstream: MockUpstream) -> list[str]:
    return [r["body"]["model"] for r in upstream.requests() if r["path"].endswith("/chat/completions")]


def test_a_503_then_an_unreachable_model_end_at_the_third(gw: Gateway, upstream: MockUpstream) -> None:
    """a answers 503 for good, b cannot be reached: c answers, in its provider's name, within the deadline; the
    headers say which model answered after how many hops; the log line names both failures; the metric counts."""
    upstream.faults({"model": "fb-a", "status": 503, "times": -1})
    started = time.monotonic()
    response = post(gw, chat("fb-a"))
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 20
    assert response.json()["model"] == "deepseek-chat"  # the body as the provider sent it (c's model_map)
    assert response.headers["x-gateway-model"] == "fb-c"
    assert response.headers["x-gateway-fallback-hops"] == "2"
    line = line_of(gw, response)
    assert line["model"] == "fb-a" and line["served_model"] == "fb-c" and line["fallback_hops"] == 2
    assert line["fallbacks"] == [
        {"from": "fb-a", "to": "fb-b", "reason": "server_error", "status": 503},
        {"from": "fb-b", "to": "fb-c", "reason": "unreachable", "status": 502},
    ]
    assert sent_models(upstream) == ["fb-a"] * 3 + ["deepseek-chat"]  # a's retries, then c (b never answered)
    metrics = requests.get(gw.metrics_url, timeout=10).text
    assert re.search(r'gateway_fallbacks_total\{from="fb-a",reason="server_error",to="fb-b"\} [1-9]', metrics)
    assert re.search(r'gateway_fallbacks_total\{from="fb-b",reason="unreachable",to="fb-c"\} [1-9]', metrics)


def test_a_stream_falls_back_before_its_first_byte(gw: Gateway, upstream: MockUpstream) -> None:
    """A streamed request whose model fails before the head gets the next model's stream, headers included."""
    upstream.faults({"model": "fb-a", "status": 503, "times": -1})
    with post(gw, chat("fb-a", stream=True)) as response:
        assert response.status_code == 200
        assert response.headers["x-gateway-model"] == "fb-c"
        body = response.text
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    assert events and {e["model"] for e in events} == {"deepseek-chat"}
    assert body.rstrip().endswith("data: [DONE]")


def test_a_stream_that_breaks_midway_does_not_fall_back(gw: Gateway, upstream: MockUpstream) -> None:
    """After the first byte the client has a's answer: a break ends it with an error event, c is never asked."""
    upstream.faults({"model": "fb-a", "kind": "reset", "after_chunks": 2})
    with post(gw, chat("fb-a", stream=True)) as response:
        assert response.status_code == 200 and response.headers["x-gateway-model"] == "fb-a"
        body = response.text
    assert '"error"' in body
    assert sent_models(upstream) == ["fb-a"]
    assert line_of(gw, response)["fallback_hops"] == 0


def test_a_context_window_400_moves_to_the_longer_model_only_where_a_rule_says(
        gw: Gateway, upstream: MockUpstream) -> None:
    """fb-ctx's 400 context_length_exceeded -> fb-long; fb-a has no such rule: its 400 reaches the client."""
    too_long = {"status": 400, "code": "context_length_exceeded", "message": "maximum context length exceeded"}
    upstream.faults({**too_long, "model": "fb-ctx"})
    response = post(gw, chat("fb-ctx"))
    assert response.status_code == 200 and response.json()["model"] == "gpt-4o"
    assert response.headers["x-gateway-model"] == "fb-long"
    assert line_of(gw, response)["fallbacks"][0]["reason"] == "context_window"

    upstream.faults({**too_long, "model": "fb-a"})
    refused = post(gw, chat("fb-a"))
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    assert refused.headers["x-gateway-fallback-hops"] == "0"


def test_the_clients_own_errors_and_refusals_never_move(gw: Gateway, upstream: MockUpstream) -> None:
    """A plain 400 and insufficient_quota (not named by the rule) are passed on; so is a 503 the request
    refused fallbacks for with `x-gateway-fallbacks: none`."""
    upstream.faults({"model": "fb-ctx", "status": 400, "code": "invalid_value"})
    assert post(gw, chat("fb-ctx")).status_code == 400
    upstream.faults({"model": "fb-a", "status": 429, "code": "insufficient_quota", "type": "insufficient_quota"})
    assert post(gw, chat("fb-a")).status_code == 429
    upstream.faults({"model": "fb-a", "status": 503, "times": -1})
    refused = post(gw, chat("fb-a"), **{"x-gateway-fallbacks": "none"})
    assert refused.status_code == 503 and refused.headers["x-gateway-fallback-hops"] == "0"
    assert "deepseek-chat" not in sent_models(upstream)


def test_a_tenants_own_chain_replaces_the_global_one(gw: Gateway, upstream: MockUpstream) -> None:
    """The tenant's `fallbacks: {fb-a: [fb-c]}` skips fb-b: one hop."""
    upstream.faults({"model": "fb-a", "status": 503, "times": -1})
    response = post(gw, chat("fb-a"), key=OWN_KEY)
    assert response.status_code == 200 and response.headers["x-gateway-fallback-hops"] == "1"
    assert line_of(gw, response)["fallbacks"] == [{"from": "fb-a", "to": "fb-c", "reason": "server_error",
                                                   "status": 503}]


def test_a_hop_respects_the_next_models_own_limits(gw: Gateway, upstream: MockUpstream) -> None:
    """A tenant allowed 1 rpm on fb-c: the first failover is served by fb-c, the next one finds fb-c's limit
    spent and hands a's failure on instead of passing the limit by."""
    upstream.faults({"model": "fb-a", "status": 503, "times": -1})
    first = post(gw, chat("fb-a"), key=LIMITED_KEY)
    assert first.status_code == 200 and first.headers["x-gateway-model"] == "fb-c"
    second = post(gw, chat("fb-a"), key=LIMITED_KEY)
    assert second.status_code in (502, 503), second.text  # b unreachable (502), c passed over
    assert [h["to"] for h in line_of(gw, second)["fallbacks"]] == ["fb-b"]


def test_no_chain_runs_past_its_deadline(upstream_server: MockUpstream, chain_files: tuple[Path, Path],
                                         upstream: MockUpstream) -> None:
    """With a 1.5 s deadline and fb-c slow to answer, the client has a 504 at the deadline, not c's answer later."""
    upstreams, keys = chain_files
    gateway = Gateway(base_env(upstream_server, UPSTREAMS_FILE=str(upstreams), GATEWAY_KEYS_FILE=str(keys),
                               AUTH_DISABLED="false", FALLBACK_DEADLINE_SECONDS="1.5", UPSTREAM_MAX_RETRIES="0"))
    try:
        upstream.faults({"model": "fb-a", "status": 503, "times": -1},
                        {"model": "deepseek-chat", "kind": "delay", "seconds": 5})
        started = time.monotonic()
        response = post(gateway, chat("fb-a"))
        elapsed = time.monotonic() - started
        assert response.status_code == 504 and response.json()["error"]["code"] == "fallback_deadline"
        assert 1.3 < elapsed < 3.5
        assert response.headers["x-gateway-fallback-hops"] == "2"
    finally:
        gateway.stop()


def test_a_fallback_answer_is_not_served_from_the_requested_models_cache_key(
        upstream_server: MockUpstream, chain_files: tuple[Path, Path], upstream: MockUpstream) -> None:
    """fb-a fails and fb-c answers; once fb-a is back, the same request is a miss answered by fb-a itself, and
    only that answer is cached for fb-a."""
    upstreams, keys = chain_files
    gateway = Gateway(base_env(upstream_server, UPSTREAMS_FILE=str(upstreams), GATEWAY_KEYS_FILE=str(keys),
                               AUTH_DISABLED="false", CACHE_ENABLED="true", UPSTREAM_MAX_RETRIES="0"))
    try:
        body = chat("fb-a", text=f"cache me {uuid.uuid4().hex}")
        upstream.faults({"model": "fb-a", "status": 503, "times": -1})
        fallen = post(gateway, body)
        assert fallen.status_code == 200 and fallen.json()["model"] == "deepseek-chat"
        upstream.reset()
        time.sleep(0.2)  # a stored answer would be visible within 100 ms
        again = post(gateway, body)
        assert again.headers["X-Cache"] == "MISS" and again.json()["model"] == "fb-a"
        assert again.headers["x-gateway-model"] == "fb-a" and again.headers["x-gateway-fallback-hops"] == "0"
        time.sleep(0.2)
        hit = post(gateway, body)
        assert hit.headers["X-Cache"] == "HIT" and hit.json()["model"] == "fb-a"
    finally:
        gateway.stop()
