"""`/admin/keys`: issue, list, change, revoke and rotate client keys at run time (issue 14).

Guarded like every admin endpoint (ADMIN_API_KEY, compared in constant time; off without it). Each action,
refused ones included, writes one audit line on the `gateway.audit` logger: who (a fingerprint of the admin
key), what, which key, the answer's status. Never a secret: the created or rotated key is only in the answer.
"""

from __future__ import annotations

import hashlib
import logging

from flask import Blueprint, Response, g, jsonify, request

from app.errors import NotFound
from app.keys.service import KeyService
from app.proxy.admin import guard, redis_unavailable
from app.proxy.context import record, services
from app.redis_client import REDIS_FAILURES

audit_log = logging.getLogger("gateway.audit")

bp = Blueprint("admin_keys", __name__, url_prefix="/admin/keys")
bp.before_request(guard)
for _failure in REDIS_FAILURES:
    bp.register_error_handler(_failure, redis_unavailable)

ACTIONS = {
    "admin_keys.create_key": "create", "admin_keys.list_keys": "list", "admin_keys.update_key": "update",
    "admin_keys.revoke_key": "revoke", "admin_keys.rotate_key": "rotate",
}


def keys() -> KeyService:
    service = services().keys
    if service is None:
        raise NotFound("Run-time keys are off: authentication is disabled (AUTH_DISABLED=true).")
    return service


@bp.after_request
def audit(response: Response) -> Response:
    """One line per admin action, whatever its outcome."""
    admin_key = services().settings.admin_api_key
    authorized = response.status_code != 401 and admin_key
    audit_log.info("admin action", extra={
        "request_id": record().request_id, "client": record().client,
        "admin": hashlib.sha256(admin_key.encode()).hexdigest()[:12] if authorized else None,
        "action": ACTIONS.get(request.endpoint or "", request.method.lower()),
        "key_id": g.get("gw_audit_key_id") or (request.view_args or {}).get("key_id"),
        "tenant": g.get("gw_audit_tenant"), "status": response.status_code,
    })
    return response


@bp.post("")
def create_key() -> Response:
    view, secret = keys().create(request.get_json(silent=True))
    g.gw_audit_key_id, g.gw_audit_tenant = view["id"], view["tenant"]
    response = jsonify({**view, "key": secret})
    response.status_code = 201
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("")
def list_keys() -> Response:
    return jsonify({"object": "list", "data": keys().list(request.args.get("tenant") or None)})


@bp.patch("/<key_id>")
def update_key(key_id: str) -> Response:
    view = keys().update(key_id, request.get_json(silent=True))
    g.gw_audit_tenant = view["tenant"]
    return jsonify(view)


@bp.delete("/<key_id>")
def revoke_key(key_id: str) -> Response:
    view = keys().revoke(key_id)
    g.gw_audit_tenant = view["tenant"]
    return jsonify(view)


@bp.post("/<key_id>/rotate")
def rotate_key(key_id: str) -> Response:
    body = request.get_json(silent=True) if request.content_length else {}  # no body: no grace
    view, secret = keys().rotate(key_id, body)
    g.gw_audit_tenant = view["tenant"]
    response = jsonify({**view, "key": secret})
    response.headers["Cache-Control"] = "no-store"
    return response
