"""Reading a request body: bounded in time (by the worker's socket), in number per tenant, and never a 500.

The gunicorn worker (gunicorn.conf.py) bounds each read of a body with REQUEST_IDLE_TIMEOUT and the whole body
with REQUEST_BODY_TIMEOUT: a read past either raises `TimeoutError` here, answered 408. A body that breaks
HTTP's chunked framing (a size that is not hex, or larger than MAX_BODY_BYTES) is a 400. While bodies are
arriving, one tenant may have at most TENANT_MAX_PENDING_BODIES of them open in this worker: more are refused
at once (429) and their connections closed, so a tenant trickling bodies cannot take every connection.
"""

from __future__ import annotations

from flask import request
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import ClientDisconnected

from app.errors import BadRequest, RateLimited, RequestTimeout
from app.observability import metrics

TIMED_OUT = "The request body was not received in time (REQUEST_BODY_TIMEOUT, REQUEST_IDLE_TIMEOUT)."


class PendingBodies:
    """Per worker: how many requests of each tenant are receiving their body right now."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0 = no bound
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return sum(self._counts.values())

    def start(self, tenant: str) -> None:
        """One more of `tenant`'s bodies is being received; RateLimited when it already has `limit` of them."""
        count = self._counts.get(tenant, 0)
        if self.limit and count >= self.limit:
            metrics.RATELIMITED.labels("pending_bodies").inc()
            raise RateLimited(
                "Too many of this key's requests are still sending their body; retry when they have arrived.",
                code="too_many_pending_requests", headers={"Retry-After": "1"},
            )
        self._counts[tenant] = count + 1

    def done(self, tenant: str) -> None:
        left = self._counts[tenant] - 1
        if left:
            self._counts[tenant] = left
        else:
            del self._counts[tenant]


def read_body(pending: PendingBodies, tenant: str) -> bytes:
    """The whole request body, read within the worker's deadlines and the tenant's share of open bodies."""
    pending.start(tenant)  # start/done, not a context manager: this runs on every request with a body
    try:
        return request.get_data(cache=False)
    except ClientDisconnected as exc:
        # werkzeug turns every read error into this; the worker's timeout is what it wraps.
        if isinstance(exc.__context__, TimeoutError):
            raise RequestTimeout(TIMED_OUT) from None
        raise BadRequest("The request body ended before it was complete.", code="incomplete_body") from None
    except TimeoutError:
        raise RequestTimeout(TIMED_OUT) from None
    except ParseException:
        raise BadRequest("The request body is not valid chunked transfer encoding (a chunk size that is "
                         "not hexadecimal, or larger than the gateway accepts).",
                         code="invalid_chunked_body") from None
    except OSError:  # gunicorn's NoMoreData: the connection ended inside a chunked body
        raise BadRequest("The request body ended before it was complete.", code="incomplete_body") from None
    finally:
        pending.done(tenant)
