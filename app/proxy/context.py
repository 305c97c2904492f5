"""Per-request bookkeeping: the request id, the record behind the log line, and closing it out.

Data for one request lives on `g` under `gw_` names; the built services in `app.extensions["gateway"]`.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import re
from collections.abc import Callable
from typing import Any

from flask import Response, current_app, g, request

from app.api import BY_NAME, ENDPOINTS, MODELS
from app.gateway import Gateway
from app.observability import metrics, tracing
from app.observability.record import RequestRecord
from app.redis_client import RedisBudget

log = logging.getLogger(__name__)

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
ROUTE_LABELS = {endpoint.path: endpoint.label for endpoint in ENDPOINTS}
MODEL_PATH_PREFIX, MODEL_LABEL = BY_NAME[MODELS].path + "/", BY_NAME[MODELS].label  # /v1/models/{id} counts as models

NO_CACHE_STEP = "NONE"  # the metrics' cache label of a request refused or failed before the cache step

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def services() -> Gateway:
    return current_app.extensions["gateway"]


def record() -> RequestRecord:
    return g.gw_record


def redis_budget() -> RedisBudget:
    """The request's one budget of Redis time (REDIS_REQUEST_BUDGET), shared by the limiter and the cache."""
    budget = g.get("gw_redis_budget")
    if budget is None:
        budget = g.gw_redis_budget = RedisBudget(services().settings.redis_request_budget)
    return budget


def start_request() -> None:
    """Open the record for every /v1 and /admin request, before anything can refuse it."""
    req = request._get_current_object()  # the request itself: one context look-up here, not one per attribute
    path = req.path
    if not path.startswith(("/v1/", "/admin/")):
        return
    headers = req.headers
    incoming = headers.get("X-Request-ID", "")
    # 128 random bits without a syscall: an id needs to be unique, not secret (`random` reseeds after a fork).
    request_id = incoming if REQUEST_ID_PATTERN.match(incoming) else f"{random.getrandbits(128):032x}"
    rec = RequestRecord(
        request_id=request_id, method=req.method, path=path,
        client=client_address(req.remote_addr, headers.get("X-Forwarded-For"), services().trusted_networks),
    )
    g.gw_record, g.gw_on_close = rec, []
    rule = req.url_rule
    tracing.start_request(headers, req.method, rule.rule if rule is not None else None, rec)


def on_close(callback: Callable[[], None]) -> None:
    """Run `callback` when the answer has been sent (or the client left), after the stream if any."""
    g.gw_on_close.append(callback)


def finish_request(response: Response) -> Response:
    state = g._get_current_object()  # the request's `g`: one context look-up here, not one per attribute
    rec: RequestRecord | None = state.get("gw_record")
    if rec is None:
        return response
    headers = response.headers
    headers["X-Request-ID"] = rec.request_id
    rec.status = response.status_code
    if rec.cache is not None:  # only requests that reached the cache step: a refusal is no BYPASS
        headers["X-Cache"] = "HIT" if rec.cache in ("L0", "L1", "L2") else rec.cache
    for name, value in state.get("gw_limit_headers", {}).items():
        headers[name] = value  # the tenant's own limits win over the upstream's headers of that name
    callbacks: list[Callable[[], None]] = state.gw_on_close
    closer = _Closer(rec, callbacks)
    response.call_on_close(closer)
    request.environ[CLOSER_KEY] = closer  # for close_on_failure, if the response never starts
    return response


CLOSER_KEY = "gateway.close_request"


class _Closer:
    """Runs a request's close steps once: from the response's close, or from close_on_failure."""

    __slots__ = ("_rec", "_callbacks", "_done")

    def __init__(self, rec: RequestRecord, callbacks: list[Callable[[], None]]) -> None:
        self._rec, self._callbacks, self._done = rec, callbacks, False

    def __call__(self) -> None:
        if not self._done:
            self._done = True
            _close(self._rec, self._callbacks)


# DeepSeek documents `https://api.deepseek.com` (no /v1) as a base URL; clients built on it call these paths.
_API_PATHS = tuple(endpoint.path.removeprefix("/v1") for endpoint in ENDPOINTS)


def canonical_path(path: str) -> str:
    """`/chat/completions`, `/v1/chat/completions/` and the like -> the one path the routes know."""
    if len(path) > 1 and path.endswith("/"):
        path = path.rstrip("/") or "/"
    if path in _API_PATHS or path.startswith("/models/"):
        path = "/v1" + path
    return path


def canonical_paths(wsgi_app: Callable[..., Any]) -> Callable[..., Any]:
    """WSGI middleware: every later step (routing, auth, metrics labels, the log line) sees the canonical path."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        canonical = canonical_path(path)
        if canonical != path:
            environ["PATH_INFO"] = canonical
        return wsgi_app(environ, start_response)

    return app


def close_on_failure(wsgi_app: Callable[..., Any]) -> Callable[..., Any]:
    """WSGI middleware: when starting the response fails (gunicorn refusing a header, say), nothing would close
    the response, so the request's close steps (rate-limit slot, lease renewal, log line) run here instead."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        try:
            return wsgi_app(environ, start_response)
        except BaseException:
            closer = environ.pop(CLOSER_KEY, None)
            if closer is not None:
                closer()
            raise

    return app


def _close(rec: RequestRecord, callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # noqa: BLE001 - one failed step must not skip the others (slot release, log line)
            log.exception("request close step failed", extra={"request_id": rec.request_id})
    rec.finish()
    tracing.end_request(rec)
    rec.log()
    _observe(rec)


def _observe(rec: RequestRecord) -> None:
    if not rec.path.startswith("/v1/"):
        return
    route = ROUTE_LABELS.get(rec.path) or (MODEL_LABEL if rec.path.startswith(MODEL_PATH_PREFIX) else "other")
    cache = rec.cache or NO_CACHE_STEP
    metrics.child(metrics.REQUESTS, route, str(rec.status), cache).inc()
    metrics.child(metrics.REQUEST_DURATION, route, cache).observe(rec.latency_ms / 1000.0)
    if rec.upstream_ms is not None and rec.backend is not None:
        metrics.child(metrics.UPSTREAM_DURATION, rec.backend).observe(rec.upstream_ms / 1000.0)
    if rec.prompt_tokens and rec.cache not in ("L0", "L1", "L2"):
        metrics.child(metrics.TOKENS, "prompt").inc(rec.prompt_tokens)
    if rec.completion_tokens and rec.cache not in ("L0", "L1", "L2"):
        metrics.child(metrics.TOKENS, "completion").inc(rec.completion_tokens)
    if rec.tokens_saved:
        metrics.TOKENS_SAVED.inc(rec.tokens_saved)


def parse_networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def client_address(peer: str | None, forwarded_for: str | None, trusted: tuple[Any, ...]) -> str | None:
    """The peer address, unless it is a trusted proxy: then the nearest untrusted hop of X-Forwarded-For."""
    if not forwarded_for or not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _is_trusted(address: str | None, trusted: tuple[Any, ...]) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:10.0.0.1 from a dual-stack listener is 10.0.0.1
    return any(ip in network for network in trusted)
