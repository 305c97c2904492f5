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
