"""CPU of the tracing seam per request, in-process: off, and on with every span sampled and encoded.

    .venv/bin/python tools/bench_tracing.py [--requests 20000]

One "request" makes the seam calls of a streamed cache miss (server span, admission, cache look-up, one upstream
attempt and its traceparent, the stream, the cache store: 6 spans). On, the spans go through the SDK's
BatchSpanProcessor to an exporter that encodes each batch exactly as the OTLP/HTTP exporter does and sends nothing
(what an OTLP POST of a 512-span batch adds is small per span). CPU is the process's (both threads). The
gateway-level figure is `tools/bench.py proxy --traces`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OTEL_BSP_MAX_QUEUE_SIZE", "1000000")  # a tight loop outruns the exporter; drop nothing

from app.observability import otlp_wire, tracing  # noqa: E402
from app.observability.record import RequestRecord  # noqa: E402

SPANS_PER_REQUEST = 6


class EncodingSink:
    """A span exporter that encodes each batch as the gateway's OTLP exporter does, and drops the bytes."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans):  # noqa: ANN001, ANN201 - the SDK's SpanExporter interface
        from opentelemetry.sdk.trace.export import SpanExportResult

        otlp_wire.encode_request(spans)
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def no_seam(backend: object, tap: object, headers: dict[str, str]) -> None:
    """What `one_request` does besides the seam's calls (subtracted from both figures)."""
    rec = RequestRecord(request_id="bench", method="POST", path="/v1/chat/completions", client="127.0.0.1")
    rec.tenant = "bench"
    rec.model, rec.stream = "mock-gpt", True
    rec.cache = "MISS"
    {"Content-Type": "application/json"}  # noqa: B018 - the headers dict one_request builds
    rec.status, rec.prompt_tokens, rec.completion_tokens = 200, 12, 30
    rec.finish()


def one_request(backend: object, tap: object, headers: dict[str, str]) -> None:
    rec = RequestRecord(request_id="bench", method="POST", path="/v1/chat/completions", client="127.0.0.1")
    tracing.start_request(headers, "POST", "/v1/chat/completions", rec)
    with tracing.span(tracing.ADMIT):
        rec.tenant = "bench"
    rec.model, rec.stream = "mock-gpt", True
    with tracing.span(tracing.CACHE_LOOKUP) as span:
        span.cache_outcome("MISS", None, None)
    rec.cache = "MISS"
    tracing.upstream_attempt("POST", "/v1/chat/completions", backend, "abcd1234", "mock-gpt")
    tracing.traceparent({"Content-Type": "application/json"})
    tracing.upstream_done(status=200)
    stream = tracing.span(tracing.STREAM)
    stream.stream_done(tap)
    with tracing.span(tracing.CACHE_STORE):
        pass
    rec.status, rec.prompt_tokens, rec.completion_tokens = 200, 12, 30
    rec.finish()
    tracing.end_request(rec)


def measure(requests: int, rounds: int = 3, request: Callable[..., None] = one_request) -> float:
    """CPU microseconds per request: the best of `rounds` (the machine is shared; noise only ever adds)."""
    return min(_measure_once(requests, request) for _ in range(rounds))


def _measure_once(requests: int, request: Callable[..., None]) -> float:
    backend = SimpleNamespace(base_url="http://127.0.0.1:9999", name="default", upstream_model=lambda m: m)
    tap = SimpleNamespace(first_chunk={"id": "chatcmpl-1", "model": "mock-gpt"}, finish_reasons=["stop"],
                          usage={"prompt_tokens": 12, "completion_tokens": 30}, done=True)
    headers = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    for _ in range(min(requests, 2000)):  # warm up
        request(backend, tap, headers)
    tracing.flush()
    started = time.process_time()
    for _ in range(requests):
        request(backend, tap, headers)
    tracing.flush()
    return (time.process_time() - started) / requests * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args(argv)
    off = SimpleNamespace(**{name.lower(): None for name in tracing.SDK_VARIABLES})
    on = SimpleNamespace(**{**vars(off), "otel_exporter_otlp_endpoint": "http://127.0.0.1:9"})
    tracing.configure(off)
    base_us = measure(args.requests, request=no_seam)
    off_us = measure(args.requests) - base_us
    sink = EncodingSink()
    if not tracing.configure(on, exporter=sink):
        raise SystemExit("tracing did not turn on")
    on_us = measure(args.requests) - base_us
    tracing.shutdown()
    print(f"tracing off: {off_us:.2f} us per request (the seam's calls with nothing behind them)")
    print(f"tracing on:  {on_us:.1f} us per request ({SPANS_PER_REQUEST} spans: {on_us / SPANS_PER_REQUEST:.1f} us "
          f"per span, encoding included; {sink.spans} spans exported)")


if __name__ == "__main__":
    main()
