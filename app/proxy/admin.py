"""Admin endpoints, guarded by ADMIN_API_KEY; without that setting they do not exist (404)."""

from __future__ import annotations

import hmac
import logging

from flask import Blueprint, Response, jsonify, request

from app.errors import NotFound, ServiceUnavailable, Unauthorized
from app.proxy.context import services
from app.proxy.errors import json_error
from app.redis_client import REDIS_FAILURES

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
