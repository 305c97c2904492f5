"""The tracing seam (app/observability/tracing.py) with the SDK's in-memory exporter, and its OTLP encoder."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.span import TraceState

from app.errors import RateLimited
from app.observability import otlp_wire, tracing
from app.observability.record import RequestRecord

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
NO_ENDPOINT = SimpleNamespace(**{name.lower(): None for name in tracing.SDK_VARIABLES})
ENDPOINT = SimpleNamespace(**{**vars(NO_ENDPOINT), "otel_exporter_otlp_endpoint": "http://127.0.0.1:9"})
BACKEND = SimpleNamespace(base_url="https://api.deepseek.com", name="default",
                          upstream_model=lambda model: {"fast": "deepseek-chat"}.get(model, model))


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure(ENDPOINT, exporter=exporter)
    yield exporter
    tracing.shutdown()


def record(path: str = "/v1/chat/completions") -> RequestRecord:
    return RequestRecord(request_id="req-1", method="POST", path=path, client="10.0.0.7")


def finished(exporter: InMemorySpanExporter) -> dict[str, Any]:
    tracing.flush()
    return {span.name: span for span in exporter.get_finished_spans()}


def test_off_without_an_endpoint() -> None:
    """No OTLP endpoint: tracing stays off and every seam call does nothing."""
    assert not tracing.configure(NO_ENDPOINT)
    rec = record()
    tracing.start_request({"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"}, "POST", "/v1/chat/completions", rec)
    assert tracing.span(tracing.ADMIT) is tracing.NO_SPAN
    headers: dict[str, str] = {}
    tracing.upstream_attempt("POST", "/v1/chat/completions", BACKEND, "abcd1234", "fast")
    tracing.traceparent(headers)
    tracing.upstream_done(status=200)
    tracing.end_request(rec)
    assert headers == {} and rec.trace_id is None and not tracing.enabled()


def test_request_trace_continues_the_client_and_names_each_send(exported: InMemorySpanExporter) -> None:
    """The server span continues the client's traceparent; each send upstream (urllib3's resend too) gets a
    CLIENT span and a traceparent naming it; the GenAI attributes land on the spans."""
    rec = record()
    tracing.start_request({"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01", "tracestate": "vendor=x"}, "POST",
                          "/v1/chat/completions", rec)
    assert rec.trace_id == TRACE_ID and len(rec.span_id or "") == 16
    with pytest.raises(RateLimited), tracing.span(tracing.ADMIT):
        raise RateLimited("slow down", code="rate_limit_exceeded")
    sent = []
    tracing.upstream_attempt("POST", "/v1/chat/completions", BACKEND, "abcd1234", "fast")
    headers: dict[str, str] = {}
    tracing.traceparent(headers)
    sent.append(headers)
    tracing.upstream_retrying(SimpleNamespace(status=503), None)
    tracing.upstream_resending()
    headers = {}
    tracing.traceparent(headers)
    sent.append(headers)
    tracing.upstream_done(status=200)
    stream = tracing.span(tracing.STREAM)
    stream.stream_done(SimpleNamespace(first_chunk={"id": "chatcmpl-1", "model": "deepseek-chat-v3"},
                                       finish_reasons=["stop"], done=True,
                                       usage={"prompt_tokens": 12, "completion_tokens": 30}))
    rec.status, rec.model, rec.cache, rec.prompt_tokens = 200, "fast", "MISS", 12
    tracing.end_request(rec)

    spans = finished(exported)
    server = spans["POST /v1/chat/completions"]
    assert server.kind == SpanKind.SERVER
    assert format(server.parent.span_id, "016x") == CLIENT_SPAN and server.parent.is_remote
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert format(server.context.span_id, "016x") == rec.span_id
    assert server.context.trace_state.get("vendor") == "x"
    assert server.attributes["gen_ai.operation.name"] == "chat"
    assert server.attributes["gen_ai.request.model"] == "fast"
    assert server.attributes["gen_ai.response.model"] == "deepseek-chat-v3"
    assert server.attributes["gen_ai.usage.output_tokens"] == 30
    assert server.attributes["client.address"] == "10.0.0.7"

    admit = spans[tracing.ADMIT]
    assert admit.parent.span_id == server.context.span_id
    assert admit.status.status_code == StatusCode.ERROR and admit.attributes["error.type"] == "rate_limit_exceeded"

    attempts = sorted((s for s in exported.get_finished_spans() if s.kind == SpanKind.CLIENT),
                      key=lambda s: s.start_time)
    assert [s.name for s in attempts] == ["chat deepseek-chat", "chat deepseek-chat"]  # the name sent upstream
    assert [s.attributes["http.response.status_code"] for s in attempts] == [503, 200]
    assert attempts[1].attributes["http.request.resend_count"] == 1
    assert attempts[0].attributes["gen_ai.provider.name"] == "deepseek"
    assert attempts[0].attributes["server.address"] == "api.deepseek.com"
    assert attempts[0].attributes["server.port"] == 443
    assert [h["traceparent"] for h in sent] == [f"00-{TRACE_ID}-{s.context.span_id:016x}-01" for s in attempts]
    assert sent[0]["tracestate"] == "vendor=x"
    assert list(spans[tracing.STREAM].attributes["gen_ai.response.finish_reasons"]) == ["stop"]


def test_unsampled_request_records_nothing_but_passes_its_decision_on(
        exported: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client's unsampled traceparent (parent-based sampling): no span is exported, the upstream hears
    "not sampled" in the same trace, and the log line still names the trace."""
    rec = record()
    tracing.start_request({"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-00"}, "POST", "/v1/chat/completions", rec)
    assert tracing.span(tracing.ADMIT) is tracing.NO_SPAN
    tracing.upstream_attempt("POST", "/v1/chat/completions", BACKEND, "abcd1234", "fast")
    headers: dict[str, str] = {}
    tracing.traceparent(headers)
    tracing.upstream_done(status=200)
    rec.status = 200
    tracing.end_request(rec)
    assert finished(exported) == {}
    assert headers["traceparent"] == f"00-{TRACE_ID}-{rec.span_id}-00"
    assert rec.trace_id == TRACE_ID


def test_a_span_outside_a_request_is_not_recorded(exported: InMemorySpanExporter) -> None:
    """Background work (the L2 write after the answer) records nothing."""
    embedder = SimpleNamespace(model_id="minilm")
    assert tracing.embedding(embedder, 1) is tracing.NO_SPAN
    assert tracing.span(tracing.CACHE_STORE) is tracing.NO_SPAN


def test_server_error_marks_the_server_span(exported: InMemorySpanExporter) -> None:
    """A 5xx answer: the server span's status is ERROR with error.type; a span left open ends with the request."""
    rec = record()
    tracing.start_request({}, "POST", "/v1/chat/completions", rec)
    tracing.span(tracing.STREAM)  # never ended
    rec.status, rec.error = 502, "the upstream could not be reached"
    tracing.end_request(rec)
    spans = finished(exported)
    server = spans["POST /v1/chat/completions"]
    assert server.parent is None and server.status.status_code == StatusCode.ERROR
    assert server.attributes["error.type"] == "502"
    assert spans[tracing.STREAM].end_time == server.end_time


def sdk_spans() -> list[Any]:
    """SDK spans with every kind of field the OTLP encoder must carry."""
    provider = TracerProvider()
    tracer = provider.get_tracer("encoder-test", "1.2.3", schema_url="https://example.com/schema")
    remote = SpanContext(int(TRACE_ID, 16), int(CLIENT_SPAN, 16), is_remote=True,
                         trace_flags=TraceFlags(1), trace_state=TraceState([("vendor", "x")]))
    root = tracer.start_span("root", context=set_span_in_context(NonRecordingSpan(remote)), kind=SpanKind.SERVER,
                             attributes={"s": "text", "b": True, "f": False, "i": -3, "big": 2**62, "x": 1.5,
                                         "l": ["a", "b"], "li": [1, 2], "lb": [True], "lf": [0.5], "e": ""},
                             links=[Link(remote, {"why": "retry"})])
    root.add_event("first byte", {"n": 1})
    root.set_status(Status(StatusCode.ERROR, "boom"))
    child = tracer.start_span("child", context=set_span_in_context(root), kind=SpanKind.CLIENT)
    child.set_status(Status(StatusCode.OK))
    child.end()
    root.end()
    return [root, child]


def test_encoder_writes_what_the_sdk_encoder_writes() -> None:
    """The OTLP request the gateway sends parses to the same message the SDK's own encoder builds."""
    spans = sdk_spans()
    ours = ExportTraceServiceRequest.FromString(otlp_wire.encode_request(spans))
    assert ours == encode_spans(spans)
    assert otlp_wire.encode_request(spans) == otlp_wire.encode_request(spans)  # cached attributes encode the same


def test_encoder_tells_true_from_one() -> None:
    """Cached attribute encodings are per type: True and 1 (equal in Python) stay a bool and an int."""
    provider = TracerProvider()
    tracer = provider.get_tracer("encoder-test")
    spans = []
    for value in (1, True, 1, True):
        span = tracer.start_span("s", attributes={"v": value})
        span.end()
        spans.append(span)
    assert ExportTraceServiceRequest.FromString(otlp_wire.encode_request(spans)) == encode_spans(spans)
