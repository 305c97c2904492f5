"""Every failure becomes an OpenAI-style error JSON with the right status; never a trace."""

from __future__ import annotations

import json
import logging

from flask import Flask, Response, g
from werkzeug.exceptions import HTTPException

from app.errors import GatewayError, InternalError, error_body

log = logging.getLogger(__name__)

HTTP_ERROR_CODES = {
    400: ("invalid_request_error", "bad_request"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
}


def json_error(status: int, body: dict, headers: dict[str, str] | None = None) -> Response:
    response = Response(json.dumps(body), status=status, content_type="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(GatewayError)
    def gateway_error(exc: GatewayError) -> Response:
        rec = g.get("gw_record")
        if rec is not None:
            rec.error = exc.code or exc.error_type
        return json_error(exc.status, exc.body(), exc.headers)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        error_type, code = HTTP_ERROR_CODES.get(status, ("invalid_request_error", None))
        message = {
            404: "Unknown route: see /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.",
            413: "The request body is larger than the gateway accepts (MAX_BODY_BYTES).",
        }.get(status, exc.description or exc.name)
        headers = {}
        valid_methods = getattr(exc, "valid_methods", None)
        if status == 405 and valid_methods:
            headers["Allow"] = ", ".join(valid_methods)  # RFC 9110: a 405 says which methods the resource takes
        return json_error(status, error_body(message, error_type, code), headers)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        # A bug: log it with its trace for us, answer without one for the client.
        log.exception("unhandled error", extra={"request_id": getattr(g.get("gw_record"), "request_id", None)})
        return json_error(500, InternalError("The gateway failed to handle this request.").body())
