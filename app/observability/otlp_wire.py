"""OTLP trace export in protobuf's wire format: the request the SDK's OTLP/HTTP exporter would send, written directly.

app/observability/tracing.py hands finished spans (SDK `ReadableSpan`s) to the SDK's batch processor, whose
exporter is the SDK's own OTLP/HTTP exporter (endpoint, headers, TLS, compression, timeout and retries from
OTEL_EXPORTER_OTLP_*) with only its encoding replaced by `encode_request`: the SDK's encoder builds every protobuf
message and copies it into its parent, level by level, and cost several times a request's whole tracing budget
(measured; tests/unit/test_tracing.py checks this encoding against the SDK's, message by message).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


def exporter_class(base: type) -> type:
    """The SDK's OTLP/HTTP span exporter (endpoint, headers, TLS, compression, timeout and retries from
    OTEL_EXPORTER_OTLP_*), sending each batch as `encode_request` writes it.

    Measured on the 2-core target, the exporter's own encoder cost about 37 us per span plus 10 us per attribute
    (it builds every protobuf message, then copies it into its parent, level by level), most of this module's
    CPU per request; building the request in place writes the same message for a fraction of it
    (tests/unit/test_tracing.py compares the two).
    """
    from opentelemetry.sdk.trace.export import SpanExportResult

    class OTLPSpanExporter(base):  # type: ignore[misc, valid-type]
        def export(self, spans: Any) -> Any:
            if self._shutdown:
                return SpanExportResult.FAILURE
            try:
                data = encode_request(spans)
            except Exception:  # noqa: BLE001 - a batch that cannot be encoded is dropped, never raised at a request
                log.exception("a batch of spans could not be encoded")
                return SpanExportResult.FAILURE
            result = self._client.export(data)
            return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE

    return OTLPSpanExporter


def encode_request(spans: Any) -> bytes:
    """An OTLP `ExportTraceServiceRequest` of SDK spans (`ReadableSpan`), serialised: spans grouped by resource,
    then instrumentation scope, as the SDK's encoder groups them (by object: the gateway has one of each).

    Written straight in protobuf's wire format (the OTLP trace messages are few and stable); the test compares
    it, parsed with opentelemetry-proto, with the SDK encoder's message.
    """
    groups: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
    for sdk_span in spans:
        resource, scope = sdk_span.resource, sdk_span.instrumentation_scope
        by_scope = groups.setdefault(id(resource), (resource, {}))[1]
        by_scope.setdefault(id(scope), (scope, []))[1].append(_span_bytes(sdk_span))
    out = []
    for resource, by_scope in groups.values():
        body = [_field(0x0A, _attributes_bytes(0x0A, resource.attributes))]
        for scope, encoded in by_scope.values():
            scope_spans = [_field(0x0A, _scope_bytes(scope))]
            scope_spans += [_field(0x12, span_bytes) for span_bytes in encoded]
            if scope is not None and scope.schema_url:
                scope_spans.append(_field(0x1A, scope.schema_url.encode()))
            body.append(_field(0x12, b"".join(scope_spans)))
        if resource.schema_url:
            body.append(_field(0x1A, resource.schema_url.encode()))
        out.append(_field(0x0A, b"".join(body)))
    return b"".join(out)


_KINDS = {"INTERNAL": 1, "SERVER": 2, "CLIENT": 3, "PRODUCER": 4, "CONSUMER": 5}
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # SpanFlags: whether the parent is remote is known, and it is
_U64 = (1 << 64) - 1
_pack_fixed64, _pack_fixed32 = struct.Struct("<Q").pack, struct.Struct("<I").pack
_pack_double = struct.Struct("<d").pack
_SMALL = [bytes([n]) for n in range(128)]


def _varint(value: int) -> bytes:
    if value < 128:
        return _SMALL[value]
    out = bytearray()
    while value > 127:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (tag is the one-byte key: field number << 3 | 2)."""
    return _SMALL[tag] + _SMALL[len(payload)] + payload if len(payload) < 128 and tag < 128 \
        else bytes([tag]) + _varint(len(payload)) + payload


def _span_bytes(sdk_span: Any) -> bytes:
    context = sdk_span.context
    parts = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"), b"\x12\x08", context.span_id.to_bytes(8, "big")]
    if context.trace_state:
        parts.append(_field(0x1A, ",".join(f"{k}={v}" for k, v in context.trace_state.items()).encode()))
    parent = sdk_span.parent
    flags = _HAS_IS_REMOTE
    if parent is not None:
        parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
        if parent.is_remote:
            flags |= _IS_REMOTE
    parts += (_field(0x2A, sdk_span.name.encode()), b"\x30", _SMALL[_KINDS[sdk_span.kind.name]])
    if sdk_span.start_time:
        parts += (b"\x39", _pack_fixed64(sdk_span.start_time))
    if sdk_span.end_time:
        parts += (b"\x41", _pack_fixed64(sdk_span.end_time))
    parts += [_span_attribute(key, value) for key, value in (sdk_span.attributes or {}).items()]
    if sdk_span.dropped_attributes:
        parts += (b"\x50", _varint(sdk_span.dropped_attributes))
    for event in sdk_span.events:
        event_parts = [b"\x09", _pack_fixed64(event.timestamp), _field(0x12, event.name.encode()),
                       _attributes_bytes(0x1A, event.attributes)]
        if event.dropped_attributes:
            event_parts += (b"\x20", _varint(event.dropped_attributes))
        parts.append(_field(0x5A, b"".join(event_parts)))
    if sdk_span.dropped_events:
        parts += (b"\x60", _varint(sdk_span.dropped_events))
    for link in sdk_span.links:
        link_parts = [b"\x0a\x10", link.context.trace_id.to_bytes(16, "big"),
                      b"\x12\x08", link.context.span_id.to_bytes(8, "big"), _attributes_bytes(0x22, link.attributes)]
        if link.dropped_attributes:
            link_parts += (b"\x28", _varint(link.dropped_attributes))
        link_parts += (b"\x35", _pack_fixed32(_HAS_IS_REMOTE | (_IS_REMOTE if link.context.is_remote else 0)))
        parts.append(_field(0x6A, b"".join(link_parts)))
    if sdk_span.dropped_links:
        parts += (b"\x70", _varint(sdk_span.dropped_links))
    status = sdk_span.status
    status_parts = []
    if status is not None:
        if status.description:
            status_parts.append(_field(0x12, status.description.encode()))
        if status.status_code.value:
            status_parts += (b"\x18", _varint(status.status_code.value))
    parts += (_field(0x7A, b"".join(status_parts)), b"\x85\x01", _pack_fixed32(flags))
    return b"".join(parts)


# Encoded span attributes by (key, value): most repeat from request to request (method, route, model, provider,
# address, key fingerprint, status, ...). Values unique to a request are not kept; the whole cache is dropped
# when full.
_ENCODED: dict[tuple[str, type, Any], bytes] = {}
_ENCODED_MAX = 4096
_UNIQUE_VALUES = frozenset({"gateway.request_id", "gen_ai.response.id", "client.address",
                            "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"})


def _span_attribute(key: str, value: Any) -> bytes:
    """One span attribute field, from the cache when its (key, value) was encoded before."""
    kind = type(value)
    if kind not in (str, int, bool) or key in _UNIQUE_VALUES:
        return _field(0x4A, _key_value(key, value))
    cached = (key, kind, value)  # the type too: True == 1, and they encode differently
    encoded = _ENCODED.get(cached)
    if encoded is None:
        if len(_ENCODED) >= _ENCODED_MAX:
            _ENCODED.clear()
        encoded = _ENCODED[cached] = _field(0x4A, _key_value(key, value))
    return encoded


def _scope_bytes(scope: Any) -> bytes:
    if scope is None:
        return b""
    parts = [_field(0x0A, scope.name.encode())] if scope.name else []
    if scope.version:
        parts.append(_field(0x12, scope.version.encode()))
    parts.append(_attributes_bytes(0x1A, scope.attributes))
    return b"".join(parts)


def _attributes_bytes(tag: int, attributes: Any) -> bytes:
    return b"".join(_field(tag, _key_value(key, value)) for key, value in (attributes or {}).items())


def _key_value(key: str, value: Any) -> bytes:
    return _field(0x0A, key.encode()) + _field(0x12, _any_value(value))


def _any_value(value: Any) -> bytes:
    """OTLP's AnyValue of an attribute value (what the SDK keeps: str, bool, int, float, bytes, sequences)."""
    if isinstance(value, str):
        return _field(0x0A, value.encode())
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & _U64)
    if isinstance(value, float):
        return b"\x21" + _pack_double(value)
    if isinstance(value, bytes):
        return _field(0x3A, value)
    if value is None:
        return b""
    if isinstance(value, Mapping):
        return _field(0x32, b"".join(_field(0x0A, _key_value(str(k), v)) for k, v in value.items()))
    return _field(0x2A, b"".join(_field(0x0A, _any_value(item)) for item in value))
