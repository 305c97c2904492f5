"""CORS for browser clients: off unless `CORS_ALLOW_ORIGINS` names origins (or `*`).

A preflight (`OPTIONS` with `Access-Control-Request-Method`) is answered here, before authentication: browsers
never send credentials on it. Every answer to an allowed origin says so and exposes the headers a browser client
may read (request id, cache, rate limits, Retry-After); other origins get no CORS headers, so browsers refuse.
"""

from __future__ import annotations

from flask import Flask, Response, request

from app.errors import Forbidden, error_body
from app.proxy.errors import json_error

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
EXPOSE_HEADERS = ", ".join((
    "x-request-id", "x-cache", "x-cache-layer", "x-cache-similarity", "retry-after", "x-should-retry",
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
    "openai-processing-ms", "openai-organization", "openai-version",
))
# What the openai SDKs send from a browser when the preflight does not list its headers (it always does).
DEFAULT_ALLOW_HEADERS = "authorization, content-type, x-request-id, cache-control, x-cache-ttl, openai-organization"
PREFLIGHT_MAX_AGE = "600"


def register_cors(app: Flask, origins: tuple[str, ...]) -> None:
    """Wire CORS into the app when origins are configured; with none, nothing changes."""
    if not origins:
        return
    any_origin = "*" in origins
    allowed = frozenset(origins)

    def allow_origin(origin: str | None) -> str | None:
        if not origin:
            return None
        if any_origin:
            return "*"
        return origin if origin.lower() in allowed else None

    def preflight() -> Response | None:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        origin = request.headers.get("Origin")
        value = allow_origin(origin)
        if value is None:
            refused = Forbidden(f"Origin {origin!r} is not allowed (CORS_ALLOW_ORIGINS).", code="cors_origin_refused")
            return json_error(refused.status, error_body(refused.message, refused.error_type, refused.code),
                              {"Vary": "Origin"})
        response = Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
        response.headers["Access-Control-Allow-Headers"] = (
            request.headers.get("Access-Control-Request-Headers") or DEFAULT_ALLOW_HEADERS)
        response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
        return response

    def add_headers(response: Response) -> Response:
        value = allow_origin(request.headers.get("Origin"))
        if value is not None:
            response.headers["Access-Control-Allow-Origin"] = value
            if request.method != "OPTIONS":
                response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        if not any_origin:
            response.vary.add("Origin")
        return response

    app.before_request(preflight)
    app.after_request(add_headers)
