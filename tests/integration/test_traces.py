"""Traces (OpenTelemetry) of real gunicorn gateways, received by an OTLP/HTTP receiver in this process.

The receiver decodes what the gateway's exporter sends with opentelemetry-proto; the mock upstream records the
`traceparent` of every request it gets.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.support import Gateway, MockUpstream, OtlpReceiver, base_env

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

CLIENT_KEY = "sk-gw-traces-" + uuid.uuid4().hex[:12]
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    yield server
    server.stop()


def traced_env(upstream: MockUpstream, receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    """Two upstream keys, a client key with a rate limit, L2 on, spans exported within 0.2 s."""
    keys = ",".join(f"sk-upstream-traces-{uuid.uuid4().hex[:12]}" for _ in range(2))
    return base_env(upstream, **{
        "UPSTREAM_API_KEYS": keys, "AUTH_DISABLED": "false", "GATEWAY_API_KEYS": f"team:{CLIENT_KEY}",
        "RATE_LIMIT_RPM": "100000", "SEMANTIC_CACHE_ENABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "gateway-under-test", "OTEL_BSP_SCHEDULE_DELAY": "200", **extra})


@pytest.fixture(scope="module")
def traced(upstream_server: MockUpstream, receiver: OtlpReceiver) -> Iterator[Gateway]:
    gateway = Gateway(traced_env(upstream_server, receiver), workers=2)
    yield gateway
    gateway.stop()


def chat(gateway: Gateway, question: str, *, traceparent: str | None = None, stream: bool = False,
         **fields: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    if traceparent:
        headers["traceparent"] = traceparent
    body = {"model": "mock-gpt", "messages": [{"role": "user", "content": question}], "stream": stream, **fields}
    with requests.Session() as session:  # closed: an idle keep-alive connection would hold the gateway's stop
        response = session.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response


def wait_for_trace(receiver: OtlpReceiver, trace_id: str, spans: int, timeout: float = 10) -> list[dict[str, Any]]:
    """The trace's spans once at least `spans` of them (and its server span) arrived."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = receiver.trace(trace_id)
        if len(found) >= spans and any(span["kind"] == "SERVER" for span in found):
            return found
        time.sleep(0.05)
    raise AssertionError(f"trace {trace_id}: {len(receiver.trace(trace_id))} spans after {timeout}s")


def one(spans: list[dict[str, Any]], name: str) -> dict[str, Any]:
    named = [span for span in spans if span["name"] == name]
    assert len(named) == 1, [span["name"] for span in spans]
    return named[0]


def request_line(gateway: Gateway, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [line for line in gateway.request_lines() if line.get("request_id") == request_id]
        if lines:
            return lines[0]
        time.sleep(0.05)
    raise AssertionError(f"no log line for request {request_id}")


def test_streamed_miss_with_retries_is_one_trace(traced: Gateway, upstream: MockUpstream,
                                                 receiver: OtlpReceiver) -> None:
    """A streamed miss whose first key is rate limited and whose second answers 503 once: the client's trace
    goes on through admission, the cache, three upstream attempts (each sent with its own traceparent), the stream
    and the cache store, with the GenAI attributes."""
    trace_id = uuid.uuid4().hex
    upstream.faults({"status": 429, "retry_after": 60}, {"status": 503})  # key switch, then urllib3's own retry
    response = chat(traced, f"What is trace {trace_id}?", stream=True,
                    traceparent=f"00-{trace_id}-{CLIENT_SPAN}-01")
    assert b"[DONE]" in response.content
    spans = wait_for_trace(receiver, trace_id, 8)

    server = one(spans, "POST /v1/chat/completions")
    assert server["kind"] == "SERVER" and server["parent_id"] == CLIENT_SPAN  # the client's trace continued
    assert server["resource"]["service.name"] == "gateway-under-test"
    assert server["scope"] == "g-aigateway"
    attributes = server["attributes"]
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "mock-gpt"
    assert attributes["gen_ai.response.model"] == "mock-gpt"
    assert attributes["gen_ai.usage.input_tokens"] > 0 and attributes["gen_ai.usage.output_tokens"] > 0
    assert attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert attributes["http.response.status_code"] == 200 and attributes["http.route"] == "/v1/chat/completions"
    assert attributes["gateway.cache"] == "MISS" and attributes["gateway.tenant"] == "team"
    assert attributes["gateway.upstream.retries"] == 2

    children = {span["name"] for span in spans if span["parent_id"] == server["span_id"]}
    assert children == {"gateway.admit", "gateway.cache.lookup", "chat mock-gpt", "gateway.stream",
                        "gateway.cache.store"}
    assert one(spans, "gateway.cache.lookup")["attributes"]["gateway.cache.result"] == "miss"
    stream = one(spans, "gateway.stream")
    assert stream["attributes"]["gateway.stream.complete"] is True
    assert stream["attributes"]["gen_ai.usage.output_tokens"] == attributes["gen_ai.usage.output_tokens"]

    attempts = sorted((span for span in spans if span["name"] == "chat mock-gpt"), key=lambda span: span["start"])
    assert [a["attributes"]["http.response.status_code"] for a in attempts] == [429, 503, 200]
    assert [a["attributes"].get("http.request.resend_count", 0) for a in attempts] == [0, 1, 2]
    assert [a["status"] for a in attempts] == ["ERROR", "ERROR", "UNSET"]
    keys = [a["attributes"]["gateway.upstream.key_id"] for a in attempts]
    assert keys[0] != keys[1] == keys[2]  # the 429 moved to the other key; urllib3 retried the 503 on it
    for attempt in attempts:
        assert attempt["kind"] == "CLIENT"
        assert attempt["attributes"]["gen_ai.provider.name"] == "openai"
        assert attempt["attributes"]["gen_ai.operation.name"] == "chat"
        assert attempt["attributes"]["server.address"] == "127.0.0.1"
        assert attempt["attributes"]["server.port"] == upstream.port
        assert len(attempt["attributes"]["gateway.upstream.key_id"]) == 8  # a fingerprint, never the key

    sent = [r["headers"].get("traceparent") for r in upstream.requests() if r["path"].endswith("/chat/completions")]
    assert sent == [f"00-{trace_id}-{a['span_id']}-01" for a in attempts]  # each send names its own span

    line = request_line(traced, attributes["gateway.request_id"])
    assert line["trace_id"] == trace_id and line["span_id"] == server["span_id"]
    assert "MonkeyPatchWarning" not in traced.logs()


def test_log_line_carries_the_trace_of_a_request_without_traceparent(traced: Gateway, upstream: MockUpstream,
                                                                     receiver: OtlpReceiver) -> None:
    """Without a traceparent the gateway starts a trace: the log line names it, and so does the upstream."""
    request_id = uuid.uuid4().hex
    with requests.Session() as session:
        response = session.post(traced.url + "/v1/chat/completions", timeout=30,
                                headers={"Authorization": f"Bearer {CLIENT_KEY}", "X-Request-ID": request_id},
                                json={"model": "mock-gpt", "messages": [{"role": "user", "content": request_id}]})
    assert response.status_code == 200
    line = request_line(traced, request_id)
    trace_id = line["trace_id"]
    assert len(trace_id) == 32 and int(trace_id, 16)
    server = one(wait_for_trace(receiver, trace_id, 4), "POST /v1/chat/completions")
    assert server["parent_id"] == "" and server["span_id"] == line["span_id"]
    assert server["attributes"]["gateway.request_id"] == request_id
    (sent,) = [r["headers"]["traceparent"] for r in upstream.requests()]
    assert sent.startswith(f"00-{trace_id}-")


def test_l2_hit_shows_the_embedding_and_the_similarity(traced: Gateway, upstream: MockUpstream,
                                                       receiver: OtlpReceiver, unique: str) -> None:
    """A paraphrase served from L2: the look-up span has the layer and similarity, the model run is its child."""
    for attempt in range(3):  # a fresh pair each time: a paraphrase that missed is an exact hit the next time
        account = f"{unique}{attempt}"
        chat(traced, f"How do I reset the password of account {account}?", temperature=0)
        time.sleep(1.0)  # the L2 entry is written after the answer (the model loads on the first look-up's need)
        trace_id = uuid.uuid4().hex
        response = chat(traced, f"How can I reset my password for account {account}?", temperature=0,
                        traceparent=f"00-{trace_id}-{CLIENT_SPAN}-01")
        if response.headers.get("X-Cache-Layer") == "L2":
            break
    assert response.headers.get("X-Cache-Layer") == "L2"
    spans = [span for span in wait_for_trace(receiver, trace_id, 3)]
    lookup = next(span for span in reversed(sorted(spans, key=lambda span: span["start"]))
                  if span["name"] == "gateway.cache.lookup")
    assert lookup["attributes"]["gateway.cache.result"] == "hit"
    assert lookup["attributes"]["gateway.cache.layer"] == "L2"
    assert lookup["attributes"]["gateway.cache.similarity"] == pytest.approx(
        float(response.headers["X-Cache-Similarity"]), abs=1e-3)
    embeddings = [span for span in spans if span["parent_id"] == lookup["span_id"]]
    assert embeddings and all(span["name"].startswith("embeddings ") for span in embeddings)
    assert embeddings[0]["attributes"]["gen_ai.operation.name"] == "embeddings"


def test_spans_queued_at_a_graceful_stop_are_exported(upstream: MockUpstream, receiver: OtlpReceiver) -> None:
    """Spans waiting for their batch when the gateway is told to stop are sent before the workers exit."""
    gateway = Gateway(traced_env(upstream, receiver, OTEL_BSP_SCHEDULE_DELAY="600000"))
    try:
        trace_id = uuid.uuid4().hex
        chat(gateway, "flushed at exit?", traceparent=f"00-{trace_id}-{CLIENT_SPAN}-01")
        time.sleep(0.5)
        assert receiver.trace(trace_id) == []  # still queued: the batch is not due for ten minutes
    finally:
        gateway.stop()
    assert one(receiver.trace(trace_id), "POST /v1/chat/completions")["parent_id"] == CLIENT_SPAN


def test_tracing_off_sends_no_traceparent(upstream: MockUpstream) -> None:
    """Without an OTLP endpoint nothing is traced: no traceparent upstream, no trace in the log line."""
    gateway = Gateway(base_env(upstream, AUTH_DISABLED="false", GATEWAY_API_KEYS=f"team:{CLIENT_KEY}"))
    try:
        trace_id = uuid.uuid4().hex
        with requests.Session() as session:
            response = session.post(gateway.url + "/v1/chat/completions", timeout=30,
                                    headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01",
                                             "Authorization": f"Bearer {CLIENT_KEY}"},
                                    json={"model": "mock-gpt", "messages": [{"role": "user", "content": trace_id}]})
        assert response.status_code == 200
        (sent,) = upstream.requests()
        assert "traceparent" not in {name.lower() for name in sent["headers"]}
        line = request_line(gateway, response.headers["X-Request-ID"])
        assert line["trace_id"] is None
    finally:
        gateway.stop()
