"""OpenTelemetry traces of each request: off unless an OTLP endpoint is configured (the standard `OTEL_*`).

The rest of the gateway calls the small seam below (`start_request`, `span`, `upstream_attempt`, ...). Whether
tracing is on is decided once per worker by `configure` (from `create_app`, after gunicorn's fork and gevent's
patching); when it is off every seam call returns at its first line, or hands back one shared no-op span.

One request's trace (all spans of the gateway's own instrumentation scope):

    POST /v1/chat/completions        SERVER  continues the client's `traceparent`; GenAI and HTTP attributes
      gateway.admit                          authentication + rate limit
      gateway.cache.lookup                   layer, result, similarity
        embeddings <model>                   the transformer run an L2 look-up needed
      chat <model>                   CLIENT  one per upstream attempt (urllib3's resends and key switches too);
                                             each request sent upstream carries a `traceparent` naming its span
      gateway.stream                         the streamed body, head to last byte; response model and usage
      gateway.cache.store

The SDK does what it has: the sampler (OTEL_TRACES_SAMPLER, _ARG), ids, the resource (OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES), the batch processor (OTEL_BSP_*) and the OTLP/HTTP exporter (OTEL_EXPORTER_OTLP_*).
The sampler decides once per request, at its server span (the SDK's samplers give a request's children their
parent's decision anyway). A sampled request's spans are recorded as plain data while it runs and handed to the
batch processor as SDK `ReadableSpan`s when it ends: measured on the 2-core target, the SDK's own live spans
(locks, attribute checks, processors at start and end) cost about 30 us each, several times what one request may
spend on its whole trace. A request's state is one ContextVar, which gevent keeps per greenlet.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from app.api import BY_PATH
from app.observability.otlp_wire import exporter_class

log = logging.getLogger(__name__)

SCOPE = "g-aigateway"
DEFAULT_SERVICE_NAME = "g-aigateway"

ADMIT = "gateway.admit"
CACHE_LOOKUP = "gateway.cache.lookup"
CACHE_STORE = "gateway.cache.store"
STREAM = "gateway.stream"

# gen_ai.provider.name by upstream host; any other OpenAI-compatible API is reported in OpenAI's flavour.
PROVIDERS = {
    "api.openai.com": "openai", "api.deepseek.com": "deepseek", "api.anthropic.com": "anthropic",
    "api.mistral.ai": "mistral_ai", "api.groq.com": "groq", "api.x.ai": "x_ai", "api.perplexity.ai": "perplexity",
}
# Settings (app/config.py) the SDK reads from the environment itself; `configure` hands `.env`'s values on to it.
SDK_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME",
                 "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG")

SERVER, CLIENT, INTERNAL = "SERVER", "CLIENT", "INTERNAL"


class _Sdk:
    """What a traced worker holds: the SDK's provider, sampler, ids, processor, and the API types it needs."""

    def __init__(self, provider: Any, processor: Any) -> None:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, get_current_span
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider, self.processor = provider, processor
        self.sampler, self.ids, self.resource = provider.sampler, provider.id_generator, provider.resource
        self.scope = InstrumentationScope(SCOPE)
        self.propagator = TraceContextTextMapPropagator()
        self.readable_span, self.span_context, self.get_current_span = ReadableSpan, SpanContext, get_current_span
        self.kinds = {SERVER: SpanKind.SERVER, CLIENT: SpanKind.CLIENT, INTERNAL: SpanKind.INTERNAL}
        self.unset, self.error = Status(StatusCode.UNSET), (lambda text: Status(StatusCode.ERROR, text))
        self.sampled, self.random_id = TraceFlags.SAMPLED, TraceFlags.RANDOM_TRACE_ID
        self.trace_flags = TraceFlags


_sdk: _Sdk | None = None  # while tracing is on; None is the one thing the seam checks


# -- set-up ----------------------------------------------------------------------------------------------------


def configure(settings: Any, exporter: Any = None) -> bool:
    """Turn tracing on for this worker when an OTLP endpoint is configured; True when it is on.

    Called by `create_app` in every worker (after the fork: the batch processor's thread and the exporter's
    connections are the worker's own). The SDK parses its own variables; values from `.env` are handed to it
    through the environment, which the real environment's values win over. `exporter` replaces the OTLP
    exporter (tests, tools/bench_tracing.py).
    """
    global _sdk
    shutdown()
    values = {name: getattr(settings, name.lower(), None) for name in SDK_VARIABLES}
    if not (values["OTEL_EXPORTER_OTLP_ENDPOINT"] or values["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]):
        return False
    for name, value in values.items():
        if value is not None and not os.environ.get(name):
            os.environ[name] = str(value)

    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=_resource())  # sampler: OTEL_TRACES_SAMPLER(_ARG), by the SDK
    if not hasattr(provider.get_tracer(SCOPE), "sampler"):  # OTEL_SDK_DISABLED=true: a no-op tracer
        provider.shutdown()
        return False
    processor = BatchSpanProcessor(exporter or exporter_class(OTLPSpanExporter)())  # OTEL_BSP_*, OTEL_EXPORTER_*
    provider.add_span_processor(processor)  # so the provider's shutdown (and its atexit hook) flushes it
    _sdk = _Sdk(provider, processor)
    return True


def _resource() -> Any:
    """The SDK's resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, a per-process instance id), named
    `g-aigateway` unless configured."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def flush() -> None:
    """Export every ended span now (tests)."""
    if _sdk is not None:
        _sdk.provider.force_flush()


def shutdown() -> None:
    """Export what is queued and stop (gunicorn's `worker_exit`, on a graceful stop); tracing is off after it."""
    global _sdk
    sdk, _sdk = _sdk, None
    if sdk is not None:
        try:
            sdk.provider.shutdown()
        except Exception:  # noqa: BLE001 - a collector that is down must not fail the worker's exit
            log.warning("traces could not be flushed at exit", exc_info=True)


def enabled() -> bool:
    return _sdk is not None


# -- what a request records -------------------------------------------------------------------------------------


class _Record:
    """One span of a sampled request, as plain data until the request ends."""

    __slots__ = ("name", "kind", "span_id", "parent", "start", "end", "attributes", "status")

    def __init__(self, name: str, kind: str, span_id: int, parent: _Record | None,
                 attributes: dict[str, Any] | None) -> None:
        self.name, self.kind, self.span_id, self.parent = name, kind, span_id, parent
        self.start, self.end = time.time_ns(), 0
        self.attributes = attributes if attributes is not None else {}
        self.status: str | None = None  # an error's description (the span's status is ERROR then)


class _Request:
    """One request's trace: its ids and sampling decision, its spans, the upstream attempt under way."""

    __slots__ = ("trace_id", "flags", "trace_state", "remote", "server_id", "server", "spans", "current",
                 "attempt", "attempt_name", "attempt_attributes", "sent", "answer")

    def __init__(self, trace_id: int, flags: int, trace_state: Any, remote: Any, server_id: int) -> None:
        self.trace_id, self.flags, self.trace_state, self.remote = trace_id, flags, trace_state, remote
        self.server_id = server_id
        self.server: _Record | None = None  # None when the request is not sampled (nothing is recorded)
        self.spans: list[_Record] = []
        self.current: _Record | None = None  # the span new children hang under
        self.attempt: _Record | None = None
        self.attempt_name = ""
        self.attempt_attributes: dict[str, Any] = {}  # of the key being tried (each of its sends)
        self.sent = 0  # sends upstream so far (http.request.resend_count of the next one)
        self.answer: dict[str, Any] = {}  # gen_ai.response.* and usage, for the server span

    def child(self, name: str, kind: str, parent: _Record | None, attributes: dict[str, Any] | None) -> _Record:
        record = _Record(name, kind, _sdk.ids.generate_span_id(), parent, attributes)  # type: ignore[union-attr]
        self.spans.append(record)
        return record


_request: ContextVar[_Request | None] = ContextVar("gateway_trace", default=None)


def _recording() -> _Request | None:
    """The current request's trace when tracing is on and the request is sampled."""
    if _sdk is None:
        return None
    state = _request.get()
    return state if state is not None and state.server is not None else None


# -- the seam ---------------------------------------------------------------------------------------------------


class _NoSpan:
    """What the seam hands out when tracing is off (or outside a sampled request): every method does nothing."""

    __slots__ = ()

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set(self, name: str, value: Any) -> None:
        return None

    def cache_outcome(self, outcome: str | None, reason: str | None, hit: Any) -> None:
        return None

    def stream_done(self, tap: Any) -> None:
        return None

    def end(self) -> None:
        return None


NO_SPAN = _NoSpan()


class _Span:
    """A child of the current span; a context manager, or ended with `end()`."""

    __slots__ = ("record", "state", "parent")

    def __init__(self, name: str, state: _Request, attributes: dict[str, Any] | None, kind: str = INTERNAL) -> None:
        self.state, self.parent = state, state.current
        self.record = state.child(name, kind, self.parent, attributes)
        state.current = self.record

    def __enter__(self) -> _Span:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            _failed(self.record, exc)
        self.end()

    def set(self, name: str, value: Any) -> None:
        if value is not None:
            self.record.attributes[name] = value

    def cache_outcome(self, outcome: str | None, reason: str | None, hit: Any) -> None:
        """gateway.cache.result (hit, miss, bypass), .layer and .similarity of a hit, .reason (L2's decision)."""
        attributes = self.record.attributes
        attributes["gateway.cache.result"] = "hit" if hit is not None else (outcome or "").lower()
        if hit is not None:
            attributes["gateway.cache.layer"] = hit.layer
            if hit.similarity is not None:
                attributes["gateway.cache.similarity"] = hit.similarity
        if reason:
            attributes["gateway.cache.reason"] = reason

    def stream_done(self, tap: Any) -> None:
        """The stream's end: the response's model, id, finish reasons and usage as the tap saw them go by."""
        first = tap.first_chunk or {}
        self.record.attributes.update(
            _answered(self.state, first.get("model"), first.get("id"), tap.finish_reasons, tap.usage))
        self.record.attributes["gateway.stream.complete"] = bool(tap.done)
        self.end()

    def end(self) -> None:
        if not self.record.end:
            self.record.end = time.time_ns()
        if self.state.current is self.record:
            self.state.current = self.parent


def span(name: str, attributes: dict[str, Any] | None = None) -> _Span | _NoSpan:
    """A child of the request's current span (the no-op span when tracing is off or the request not sampled)."""
    if _sdk is None:
        return NO_SPAN
    state = _recording()
    return NO_SPAN if state is None else _Span(name, state, attributes)


def embedding(embedder: Any, texts: int) -> _Span | _NoSpan:
    """An embedding model's run for the request (GenAI `embeddings` operation; CLIENT when it is a remote API)."""
    if _sdk is None:
        return NO_SPAN
    state = _recording()  # None too in the background half of a store: after the answer, not part of the request
    if state is None:
        return NO_SPAN
    model = embedder.model_id
    attributes: dict[str, Any] = {"gen_ai.operation.name": "embeddings", "gen_ai.request.model": model,
                                  "gateway.embedding.texts": texts}
    endpoint = getattr(embedder, "endpoint", None)  # a remote API's; a local model runs in this process
    if endpoint:
        attributes.update(_upstream_attributes(endpoint))
    return _Span(f"embeddings {model}", state, attributes, CLIENT if endpoint else INTERNAL)


def traced(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the call is a child span `name` (nothing but one check when tracing is off)."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            if _sdk is None:
                return function(*args, **kwargs)
            with span(name):
                return function(*args, **kwargs)

        return call

    return decorate


def start_request(headers: Any, method: str, route: str | None, rec: Any) -> None:
    """Open the request's server span, continuing the client's W3C `traceparent` when it sent one; the log
    line gets the trace and span ids (sampled or not: the upstream hears of the same trace)."""
    sdk = _sdk
    if sdk is None:
        return
    name = f"{method} {route}" if route else method
    attributes = {"http.request.method": method, "url.path": rec.path, "gateway.request_id": rec.request_id}
    if route is not None:
        attributes["http.route"] = route
    if rec.client:
        attributes["client.address"] = rec.client
    parent_context, remote = None, None
    if headers.get("traceparent"):
        parent_context = sdk.propagator.extract(headers)
        remote = sdk.get_current_span(parent_context).get_span_context()
        if not remote.is_valid:
            parent_context, remote = None, None
    trace_id = remote.trace_id if remote is not None else sdk.ids.generate_trace_id()
    decision = sdk.sampler.should_sample(parent_context, trace_id, name, sdk.kinds[SERVER], attributes)
    flags = sdk.sampled if decision.decision.is_sampled() else 0
    if remote.trace_flags.random_trace_id if remote is not None else sdk.ids.is_trace_id_random():
        flags |= sdk.random_id
    state = _Request(trace_id, flags, decision.trace_state, remote, sdk.ids.generate_span_id())
    if flags & sdk.sampled:
        state.server = state.current = _Record(name, SERVER, state.server_id, None, attributes)
        if decision.attributes:
            attributes.update(decision.attributes)
    rec.trace_id, rec.span_id = format(trace_id, "032x"), format(state.server_id, "016x")
    _request.set(state)


def end_request(rec: Any) -> None:
    """Close the server span with what the request did (the record behind the log line), and hand the
    request's spans to the batch processor."""
    sdk = _sdk
    if sdk is None:
        return
    state = _request.get()
    if state is None:
        return
    _request.set(None)
    server = state.server
    if server is None:
        return
    attributes = server.attributes
    attributes["http.response.status_code"] = rec.status
    operation = _operation(rec.path)
    if operation is not None:
        attributes["gen_ai.operation.name"] = operation
    for name, value in (("gen_ai.request.model", rec.model), ("gateway.tenant", rec.tenant),
                        ("gateway.cache", rec.cache), ("gateway.upstream.key_id", rec.upstream_key_id)):
        if value is not None:
            attributes[name] = value
    if rec.retries:
        attributes["gateway.upstream.retries"] = rec.retries
    if rec.cache in ("L0", "L1", "L2"):
        if rec.tokens_saved:
            attributes["gateway.cache.tokens_saved"] = rec.tokens_saved
    else:  # paid upstream: the usage is this request's
        attributes.update(state.answer)
    if rec.status >= 500:
        attributes["error.type"] = str(rec.status)
        server.status = rec.error or str(rec.status)
    server.end = time.time_ns()
    _export(sdk, state)


def _export(sdk: _Sdk, state: _Request) -> None:
    """The request's spans as the SDK's `ReadableSpan`s, to its batch processor (a span never ended, such as
    a stream the worker stopped, ends with the request)."""
    flags, trace_state = sdk.trace_flags(state.flags), state.trace_state
    contexts: dict[int, Any] = {}
    make_context, readable, on_end = sdk.span_context, sdk.readable_span, sdk.processor.on_end
    end = state.server.end  # type: ignore[union-attr]
    for record in (state.server, *state.spans):
        context = contexts[record.span_id] = make_context(state.trace_id, record.span_id, False, flags, trace_state)
        parent = contexts.get(record.parent.span_id) if record.parent is not None else state.remote
        on_end(readable(
            record.name, context=context, parent=parent, resource=sdk.resource, attributes=record.attributes,
            kind=sdk.kinds[record.kind], status=sdk.error(record.status) if record.status else sdk.unset,
            start_time=record.start, end_time=record.end or end, instrumentation_scope=sdk.scope,
        ))


# -- upstream attempts ------------------------------------------------------------------------------------------


def upstream_attempt(method: str, path: str, backend: Any, key_id: str, model: str | None) -> None:
    """An attempt on one upstream key begins: a CLIENT span (urllib3's resends on this key get one each).

    `key_id` is the key's fingerprint; the key itself is never read here.
    """
    if _sdk is None:
        return
    state = _recording()
    if state is None:
        return
    operation = _operation(path)
    attributes = {**_upstream_attributes(backend.base_url), "gateway.upstream.backend": backend.name,
                  "gateway.upstream.key_id": key_id, "http.request.method": method}
    if operation is not None:
        attributes["gen_ai.operation.name"] = operation
    if model is not None:
        model = backend.upstream_model(model)  # the name this backend is asked for
        attributes["gen_ai.request.model"] = model
    state.attempt_name = f"{operation} {model}" if operation and model else f"{method} {path}"
    state.attempt_attributes = attributes
    state.attempt = _start_attempt(state)


def upstream_retrying(response: Any, error: BaseException | None) -> None:
    """urllib3 will send the same request again (called from the Retry policy): this attempt ends here."""
    if _sdk is None:
        return
    state = _recording()
    if state is None or state.attempt is None:
        return
    _end_attempt(state, response.status if response is not None else None, error)


def upstream_resending() -> None:
    """urllib3's backoff is over and it sends again: the next attempt's span."""
    if _sdk is None:
        return
    state = _recording()
    if state is None or state.attempt is not None or not state.attempt_attributes:
        return
    state.attempt = _start_attempt(state)


def upstream_done(status: int | None = None, error: BaseException | None = None) -> None:
    """The attempt's answer head arrived (`status`), or it failed for good (`error`)."""
    if _sdk is None:
        return
    state = _recording()
    if state is None or state.attempt is None:
        return
    _end_attempt(state, status, error)
    state.attempt_attributes = {}


def _start_attempt(state: _Request) -> _Record:
    """A CLIENT span for the next send of the current key's request."""
    attributes = dict(state.attempt_attributes)
    if state.sent:  # the HTTP conventions' count of resends within the request, key switches included
        attributes["http.request.resend_count"] = state.sent
    state.sent += 1
    return state.child(state.attempt_name, CLIENT, state.server, attributes)


def _end_attempt(state: _Request, status: int | None, error: BaseException | None) -> None:
    attempt, state.attempt = state.attempt, None
    assert attempt is not None
    if status is not None:
        attempt.attributes["http.response.status_code"] = status
        if status >= 400:
            attempt.attributes["error.type"] = str(status)
            attempt.status = str(status)
    elif error is not None:
        _failed(attempt, getattr(error, "reason", None) or error)  # urllib3's MaxRetryError wraps the cause
    attempt.end = time.time_ns()


def traceparent(headers: Any) -> None:
    """Name the current upstream attempt (else the current span) as the parent in the headers of a request
    about to be sent: W3C `traceparent`, and `tracestate`. The upstream connection calls this for every send, so
    urllib3's resends each name their own span."""
    if _sdk is None:
        return
    state = _request.get()
    if state is None:
        return
    current = state.attempt or state.current  # an upstream attempt, or a remote embedding API's span
    span_id = current.span_id if current is not None else state.server_id
    headers["traceparent"] = f"00-{state.trace_id:032x}-{span_id:016x}-{state.flags:02x}"
    if state.trace_state:
        headers["tracestate"] = state.trace_state.to_header()


_upstreams: dict[str, dict[str, Any]] = {}


def _upstream_attributes(base_url: str) -> dict[str, Any]:
    """gen_ai.provider.name (and the older gen_ai.system), server.address and server.port of a backend URL."""
    attributes = _upstreams.get(base_url)
    if attributes is None:
        parts = urlsplit(base_url)
        host = parts.hostname or ""
        provider = PROVIDERS.get(host) or ("azure.ai.openai" if host.endswith(".openai.azure.com") else "openai")
        attributes = _upstreams[base_url] = {
            "gen_ai.provider.name": provider, "gen_ai.system": provider, "server.address": host,
            "server.port": parts.port or (443 if parts.scheme == "https" else 80),
        }
    return attributes


# -- answers ----------------------------------------------------------------------------------------------------


def answered(answer: Mapping[str, Any]) -> None:
    """A complete (not streamed) answer: its model, id, finish reasons and usage, for the server span."""
    if _sdk is None:
        return
    state = _recording()
    if state is None:
        return
    choices = answer.get("choices")
    reasons = [c.get("finish_reason") for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []
    _answered(state, answer.get("model"), answer.get("id"), reasons, answer.get("usage"))


def _answered(state: _Request, model: Any, response_id: Any, reasons: Any, usage: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    if isinstance(model, str):
        attributes["gen_ai.response.model"] = model
    if isinstance(response_id, str):
        attributes["gen_ai.response.id"] = response_id
    reasons = [r for r in reasons or () if isinstance(r, str)]
    if reasons:
        attributes["gen_ai.response.finish_reasons"] = reasons
    if isinstance(usage, dict):
        for name, key in (("gen_ai.usage.input_tokens", "prompt_tokens"),
                          ("gen_ai.usage.output_tokens", "completion_tokens")):
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                attributes[name] = value
    state.answer = attributes
    return attributes


def _failed(record: _Record, exc: BaseException) -> None:
    """error.type: the gateway error's code, else the exception's class; no stack trace (errors are expected)."""
    kind = str(getattr(exc, "code", None) or type(exc).__name__)
    record.attributes["error.type"] = kind
    record.status = str(getattr(exc, "message", None) or kind)


def _operation(path: str) -> str | None:
    """gen_ai.operation.name of a route (the endpoint table's, in app/api.py)."""
    endpoint = BY_PATH.get(path)
    return endpoint.genai_operation if endpoint is not None else None
