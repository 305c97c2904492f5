"""Operational endpoints: liveness, readiness, Prometheus metrics.

/metrics is served only on METRICS_PORT (gunicorn listens there too), never on the API port: the page names
tenants' traffic and upstream key ids, which is the operator's business, not every client's. The metrics port
serves /metrics, /healthz and /readyz and nothing else.
"""

from __future__ import annotations

import json

from flask import Blueprint, Response, request

from app.errors import NotFound
from app.observability import metrics
from app.proxy.context import services

bp = Blueprint("system", __name__)

METRICS_PORT_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})


def on_metrics_port() -> bool:
    """Whether this request came in on the metrics listener (SERVER_PORT is the listening socket's port)."""
    return request.environ.get("SERVER_PORT") == str(services().settings.metrics_port)


@bp.before_app_request
def metrics_port_serves_metrics_only() -> None:
    if request.path not in METRICS_PORT_PATHS and on_metrics_port():
        raise NotFound("The metrics port serves /metrics, /healthz and /readyz only.")


@bp.get("/healthz")
def healthz() -> Response:
    """The process answers: nothing else is checked, so a Redis outage never restarts pods."""
    return Response('{"status":"ok"}', status=200, content_type="application/json")


@bp.get("/readyz")
def readyz() -> Response:
    """Ready when Redis answers (settings were validated at start, or the process would not run)."""
    gw = services()
    try:
        gw.redis.ping()
    except Exception as exc:  # noqa: BLE001 - any failure to ping is "not ready", with its reason
        body = {"status": "unavailable", "reason": f"redis: {type(exc).__name__}"}
        return Response(json.dumps(body), status=503, content_type="application/json")
    return Response('{"status":"ready"}', status=200, content_type="application/json")


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    if not on_metrics_port():
        raise NotFound("Unknown route: /metrics is served on the metrics port (METRICS_PORT) only.")
    gw = services()
    payload, content_type = metrics.render([metrics.KeyStateCollector(gw.upstream.pool.key_states)])
    return Response(payload, status=200, content_type=content_type)
