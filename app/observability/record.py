"""What one request did, collected along the way and written once as its log line."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

access_log = logging.getLogger("gateway.access")
NOT_LOGGED = ("started", "cost_nanos", "saved_nanos", "saved_usage")


@dataclass
class RequestRecord:
    """The fields of the contract's log line; filled by the proxy as the request moves on."""

    request_id: str
    method: str
    path: str
    client: str | None = None
    tenant: str | None = None
    model: str | None = None
    status: int = 0
    latency_ms: float = 0.0
    upstream_ms: float | None = None
    cache: str | None = None  # None: refused or failed before the cache step (not a bypass)
    similarity: float | None = None
    semantic: str | None = None  # why L2 served or refused (the verifier's reason), or why it was skipped
    retries: int = 0
    upstream_key_id: str | None = None
    backend: str | None = None
    served_model: str | None = None  # the model that answered from the upstream (another one after a fallback)
    fallback_hops: int = 0
    fallbacks: list[dict[str, object]] | None = None  # each hop: from, to, reason, status of the failure
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # of prompt_tokens, served by the provider's own prompt cache
    cost_usd: float | None = None  # what the upstream charged for this request (PRICES_FILE), when known
    tokens_saved: int | None = None
    saved_usd: float | None = None  # on a cache hit: what the original answer cost
    stream: bool = False
    error: str | None = None
    trace_id: str | None = None  # the request's trace when tracing is on (the client's, when it sent one)
    span_id: str | None = None  # the gateway's server span in it
    started: float = field(default_factory=time.perf_counter, repr=False)
    # Not logged: the exact amounts the budgets and rollups add up, and the usage of the answer a hit replayed.
    cost_nanos: int | None = field(default=None, repr=False)
    saved_nanos: int | None = field(default=None, repr=False)
    saved_usage: Any = field(default=None, repr=False)

    def finish(self) -> None:
        self.latency_ms = round((time.perf_counter() - self.started) * 1000.0, 2)
        if self.upstream_ms is not None:
            self.upstream_ms = round(self.upstream_ms, 2)

    def log(self) -> None:
        # One dict as the message (python-json-logger writes its keys as the line's fields): the same line as
        # `extra=` gives, without copying 30 fields onto the LogRecord and scanning them back off it.
        fields = {"message": "request", **vars(self)}  # flat fields: a shallow copy is enough
        for name in NOT_LOGGED:
            del fields[name]
        access_log.info(fields)
