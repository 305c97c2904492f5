"""Operational endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import json

from flask import Blueprint, Response

from app.observability import metrics
from app.proxy.context import services

bp = Blueprint("system", __name__)


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
    gw = services()
    payload, content_type = metrics.render([metrics.KeyStateCollector(gw.upstream.pool.key_states)])
    return Response(payload, status=200, content_type=content_type)
