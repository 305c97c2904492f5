"""The gateway's error tree; each error knows its HTTP status and OpenAI-style body.

Leaf module: everything may raise these, only the proxy turns them into responses.
"""

from __future__ import annotations

import math
from typing import Any


class GatewayError(Exception):
    """An error the client should see, as `{"error": {"message", "type", "code"}}`."""

    status = 500
    error_type = "server_error"
    code: str | None = None
    param: str | None = None  # the request field at fault, when there is one

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if param is not None:
            self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.code, self.param)


def error_body(message: str, error_type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def retry_after(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, rounded up so a client never comes back early, and at least 1."""
    return str(max(1, math.ceil(seconds - 1e-9)))


class BadRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"


def invalid_value(param: str, message: str) -> BadRequest:
    """A field of an admin request whose value the gateway cannot use, named in `param`."""
    return BadRequest(message, code="invalid_value", param=param)


class Unauthorized(GatewayError):
    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    error_type = "invalid_request_error"
    code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class RequestTimeout(GatewayError):
    """The request (its head or body) did not arrive within the read timeouts."""

    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class UpstreamResponseTooLarge(GatewayError):
    """The upstream's answer is larger than MAX_RESPONSE_BYTES: not passed on, not stored."""

    status = 502
    error_type = "upstream_error"
    code = "upstream_response_too_large"


class PayloadTooLarge(GatewayError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    error_type = "invalid_request_error"
    code = "unsupported_content_encoding"


class RateLimited(GatewayError):
    """Refused by the gateway's own limits, or every upstream key is cooling down. `type` follows OpenAI's 429s:
    "tokens" when a token limit was reached (TokensRateLimited), else "requests"."""

    status = 429
    error_type = "requests"
    code = "rate_limit_exceeded"


class TokensRateLimited(RateLimited):
    """A tenant's tokens-per-minute limit reached: OpenAI's 429 then says `"type": "tokens"`."""

    error_type = "tokens"


class BudgetExceeded(RateLimited):
    """The tenant's budget (USD per day or month) cannot cover the request: OpenAI's own quota error."""

    error_type = "insufficient_quota"
    code = "insufficient_quota"


class ServiceUnavailable(GatewayError):
    status = 503
    error_type = "server_error"
    code = "service_unavailable"


class UpstreamUnreachable(GatewayError):
    status = 502
    error_type = "upstream_error"
    code = "upstream_unreachable"


class UpstreamBadResponse(GatewayError):
    status = 502
    error_type = "upstream_error"
    code = "upstream_bad_response"


class UpstreamTimeout(GatewayError):
    status = 504
    error_type = "upstream_error"
    code = "upstream_timeout"


class InternalError(GatewayError):
    """The gateway's own failure: a bug. Answered without a trace."""

    status = 500
    error_type = "server_error"
    code = "internal_error"
