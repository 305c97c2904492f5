"""Admin endpoints, guarded by ADMIN_API_KEY; without that setting they do not exist (404)."""

from __future__ import annotations

import hmac
import logging
from datetime import UTC, date, datetime, timedelta

from flask import Blueprint, Response, jsonify, request

from app.errors import NotFound, ServiceUnavailable, Unauthorized, invalid_value
from app.proxy.context import services
from app.proxy.errors import json_error
from app.redis_client import REDIS_FAILURES
from app.spend.ledger import GROUPS

log = logging.getLogger(__name__)

bp = Blueprint("admin", __name__, url_prefix="/admin")


@bp.before_request
def guard() -> None:
    admin_key = services().settings.admin_api_key
    if not admin_key:
        raise NotFound("Admin endpoints are off: set ADMIN_API_KEY to enable them.")
    presented = request.headers.get("Authorization", "")
    if not hmac.compare_digest(presented.encode(), f"Bearer {admin_key}".encode()):
        raise Unauthorized("Admin endpoints need 'Authorization: Bearer <ADMIN_API_KEY>'.")


def redis_unavailable(exc: Exception) -> Response:
    """Admin actions live in Redis: without it they cannot be done, and the operator is told so (503)."""
    log.warning("admin action failed, Redis unavailable: %s", type(exc).__name__)
    error = ServiceUnavailable("Redis is unavailable, so this admin action could not be carried out; retry.",
                               code="redis_unavailable", headers={"Retry-After": "1"})
    return json_error(error.status, error.body(), error.headers)


for _failure in REDIS_FAILURES:
    bp.register_error_handler(_failure, redis_unavailable)


@bp.post("/upstream-keys/<key_id>/restore")
def restore_key(key_id: str) -> Response:
    """Put an upstream key that answered 401/403 (or is cooling down) back in rotation everywhere."""
    pool = services().upstream.pool
    if key_id not in {key.key_id for backend in pool.backends for key in backend.keys}:
        raise NotFound(f"No upstream key with id {key_id}.")
    pool.health.restore(key_id)
    return jsonify({"key_id": key_id, "state": "ok"})


@bp.delete("/cache")
def clear_cache() -> Response:
    """Everything, or only `?tenant=` or `?model=`: unreachable in every worker within a second."""
    cache = services().cache
    if cache is None:
        raise NotFound("The cache is off (CACHE_ENABLED=false).")
    scope = cache.invalidate(tenant=request.args.get("tenant") or None, model=request.args.get("model") or None)
    return jsonify({"cleared": scope})


@bp.get("/cache/stats")
def cache_stats() -> Response:
    cache = services().cache
    if cache is None:
        raise NotFound("The cache is off (CACHE_ENABLED=false).")
    return jsonify(cache.stats())


@bp.get("/spend")
def spend() -> Response:
    """Daily rollups: `?tenant=&model=&from=YYYY-MM-DD&to=YYYY-MM-DD&group_by=tenant,model,day` (default: today,
    by tenant and model); each row has the grouping fields, requests, cache hits, tokens, cost and savings."""
    gw = services()
    args = request.args
    today = datetime.now(UTC).date()
    last = _day(args.get("to"), "to") or today
    first = _day(args.get("from"), "from") or last
    if first > last:
        raise invalid_value("from", "`from` is after `to`.")
    span = (last - first).days + 1
    if span > gw.settings.spend_retention_days + 1:
        raise invalid_value("from",
                            f"At most {gw.settings.spend_retention_days + 1} days (SPEND_RETENTION_DAYS) at once.")
    group_by = tuple(part.strip() for part in (args.get("group_by") or "tenant,model").split(",") if part.strip())
    if not group_by or set(group_by) - set(GROUPS) or len(set(group_by)) != len(group_by):
        raise invalid_value("group_by", "`group_by` is one or more of day, model, tenant, comma-separated.")
    rows = gw.spend.ledger.report((first + timedelta(days=i) for i in range(span)),
                                  tenant=args.get("tenant") or None, model=args.get("model") or None,
                                  group_by=group_by)
    return jsonify({"object": "list", "data": rows})


def _day(value: str | None, name: str) -> date | None:
    if not value:
        return None
    try:
        if len(value) != len("YYYY-MM-DD"):
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise invalid_value(name, f"`{name}` is a date, YYYY-MM-DD (UTC).") from None
