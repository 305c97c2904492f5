"""Admin endpoints, guarded by ADMIN_API_KEY; without that setting they do not exist (404)."""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, jsonify, request

from app.errors import NotFound, Unauthorized
from app.proxy.context import services

bp = Blueprint("admin", __name__, url_prefix="/admin")


@bp.before_request
def guard() -> None:
    admin_key = services().settings.admin_api_key
    if not admin_key:
        raise NotFound("Admin endpoints are off: set ADMIN_API_KEY to enable them.")
    presented = request.headers.get("Authorization", "")
    if not hmac.compare_digest(presented.encode(), f"Bearer {admin_key}".encode()):
        raise Unauthorized("Admin endpoints need 'Authorization: Bearer <ADMIN_API_KEY>'.")


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
