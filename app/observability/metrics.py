"""Prometheus metrics, aggregated over gunicorn workers with prometheus_client's multiprocess mode.

Metric objects are module-level (the one exception to "nothing at import time"): prometheus_client picks
its multiprocess value store from PROMETHEUS_MULTIPROC_DIR when this module is imported, which happens in
the worker after gunicorn.conf.py has set the directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("gateway_requests_total", "Requests to /v1/*, refused ones included.", ["route", "status", "cache"])
REQUEST_DURATION = Histogram(
    "gateway_request_duration_seconds", "Time to the last byte of the answer.", ["route", "cache"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    "gateway_upstream_duration_seconds", "Time until the upstream's answer headers arrived (retries included).",
    ["backend"], buckets=LATENCY_BUCKETS,
)
UPSTREAM_TOO_LARGE = Counter(
    "gateway_upstream_too_large_total", "Upstream answers refused (502) for exceeding MAX_RESPONSE_BYTES.", ["backend"]
)
FALLBACKS = Counter(
    "gateway_fallbacks_total", "Requests moved to the next model of a fallback chain, by why the model failed.",
    ["from", "to", "reason"],
)
UPSTREAM_RETRIES = Counter("gateway_upstream_retries_total", "Upstream attempts repeated or moved on.", ["reason"])
CACHE_LOOKUPS = Counter("gateway_cache_lookups_total", "Cache look-ups by layer and result.", ["layer", "result"])
SEMANTIC_SIMILARITY = Histogram(
    "gateway_semantic_similarity", "Cosine similarity of the best L2 candidate.",
    buckets=(0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99, 1.0),
)
EMBEDDING_DURATION = Histogram(
    "gateway_embedding_duration_seconds", "Time to embed one query.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
EMBEDDINGS = Counter(
    "gateway_embeddings_total", "Texts embedded for L2, by stage: static (a table look-up) or transformer.", ["stage"]
)
SEMANTIC_DECISIONS = Counter(
    "gateway_semantic_decisions_total",
    "L2 candidates looked at, by outcome: served, or the rule that refused them (number, negation, score, ...).",
    ["outcome"],
)
SEMANTIC_SKIPPED = Counter(
    "gateway_semantic_skipped_total", "L2 look-ups not made, by reason (empty partition, prompt too long, ...).",
    ["reason"],
)
SEMANTIC_INDEX_ROWS = Gauge("gateway_semantic_index_rows", "Rows in the L2 indexes of the workers.",
                            multiprocess_mode="livesum")
SEMANTIC_INDEX_BYTES = Gauge("gateway_semantic_index_bytes", "Bytes held by the L2 indexes of the workers.",
                             multiprocess_mode="livesum")
BACKGROUND_DROPPED = Counter(
    "gateway_background_dropped_total", "Background jobs dropped because their queue was full.", ["queue"]
)
TOKENS = Counter("gateway_tokens_total", "Tokens paid to the upstream.", ["kind"])
TOKENS_SAVED = Counter("gateway_tokens_saved_total", "Tokens a cache hit did not pay for.")
COST = Counter("gateway_cost_usd_total", "USD paid to the upstream, at PRICES_FILE's prices (model: a priced model, "
               "else `other`).", ["model"])
COST_SAVED = Counter("gateway_cost_saved_usd_total", "USD cache hits did not pay: each priced as the original "
                     "answer's usage.", ["model"])
RATELIMITED = Counter("gateway_ratelimited_total", "Requests refused by the gateway's limits.", ["dimension"])
REDIS_ERRORS = Counter("gateway_redis_errors_total", "Redis calls that failed (the gateway degraded).", ["component"])

KEY_STATE_VALUES = {"ok": 0, "cooling": 1, "disabled": 2, "ejected": 3}


class KeyStateCollector:
    """`gateway_upstream_key_state` read at scrape time from the shared (Redis) view of key health."""

    def __init__(self, states: Callable[[], Iterable[tuple[str, str, str]]]) -> None:
        self._states = states

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "gateway_upstream_key_state",
            "Upstream key state: 0 ok, 1 cooling down (429, some model), 2 disabled, 3 ejected after failures.",
            labels=["backend", "key_id"],
        )
        for backend, key_id, state in self._states():
            family.add_metric([backend, key_id], KEY_STATE_VALUES[state])
        yield family


_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, kept: what every request records skips prometheus_client's per-call label
    checks and lock (the child is the same object either way). Only for labels of a bounded set of values."""
    key = (id(metric), values)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*values)
    return found


def render(extra: list[object]) -> tuple[bytes, str]:
    """One scrape: a fresh registry over every worker's files (multiprocess) plus live collectors."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    for collector in extra:
        registry.register(collector)  # type: ignore[arg-type]
    try:
        return generate_latest(registry), CONTENT_TYPE_LATEST
    finally:
        for collector in extra:
            registry.unregister(collector)  # type: ignore[arg-type]
