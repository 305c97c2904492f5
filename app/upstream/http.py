"""The gateway's HTTP policy, for every outside API it calls (the upstreams, the embedding API): one
`requests.Session` per client, with urllib3 `Retry` doing backoff and Retry-After for us.

Retries happen inside urllib3 before a response is handed back, so a streamed answer is only ever
retried before its first byte reaches the client.
"""

from __future__ import annotations

import email.utils
import json
import math
import time

import requests
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

from app.observability import tracing
from app.upstream.connection import OneWriteAdapter

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class UpstreamRetry(Retry):
    """urllib3 Retry that gives up at once on a Retry-After longer than `retry_after_max`.

    urllib3 would sleep the capped time and try the same key again; when the upstream asks for a long
    pause, moving to another key (or telling the client when to come back) serves the client better.
    Retry-After is read by `retry_after_seconds`: a value urllib3's parser would fail the request on (`nan`,
    `-1`, text) counts as no header, and the backoff applies.
    """

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):  # noqa: ANN001, ANN201
        if response is not None and response.status == 429:
            if is_insufficient_quota(response):
                raise MaxRetryError(_pool, url, reason=None)  # out of credit: waiting will not bring it back
            wait = retry_after_seconds(response.headers.get("Retry-After"))
            if wait is not None and wait > self.retry_after_max:
                raise MaxRetryError(_pool, url, reason=None)  # urllib3 hands the 429 back untouched
        retry = super().increment(method, url, response, error, _pool, _stacktrace)
        tracing.upstream_retrying(response, error)  # this attempt's span ends; the next starts after `sleep`
        return retry

    def sleep(self, response=None) -> None:  # noqa: ANN001 - urllib3's signature
        super().sleep(response)
        tracing.upstream_resending()

    def get_retry_after(self, response) -> float | None:  # noqa: ANN001 - urllib3's signature
        # urllib3's own parser raises InvalidHeader on a value it cannot read, which fails the whole request.
        wait = retry_after_seconds(response.headers.get("Retry-After"))
        return None if wait is None else min(wait, self.retry_after_max)


# OpenAI's "out of credit" 429s: type `insufficient_quota`, code naming the cause (or the type again).
QUOTA_CODES = frozenset({"insufficient_quota", "credit_balance_exhausted", "organization_spend_limit_exceeded",
                         "project_spend_limit_exceeded", "organization_usage_limit_exceeded"})


PEEKED_BODY = "gateway_peeked_body"  # where a 429's body read by `is_insufficient_quota` is kept on the response
PEEK_MAX_BYTES = 65536


def is_insufficient_quota(response) -> bool:  # noqa: ANN001 - a urllib3 HTTPResponse
    """A 429 that means "out of credit" (OpenAI's `insufficient_quota` code or type), not "slow down"."""
    if response.status != 429:
        return False
    error = peeked_error(response)
    return error is not None and (error.get("code") in QUOTA_CODES or error.get("type") in QUOTA_CODES)


def peeked_error(response) -> dict | None:  # noqa: ANN001 - a urllib3 HTTPResponse
    """The `error` object of an OpenAI-style error answer, or None.

    The (small) error body is read once, at most PEEK_MAX_BYTES of it, and kept on the response under
    PEEKED_BODY, so it is still passed on.
    """
    body = getattr(response, PEEKED_BODY, None)
    if body is None:
        body = response.read(PEEK_MAX_BYTES + 1, decode_content=True) or b""
        setattr(response, PEEKED_BODY, body)
    if len(body) > PEEK_MAX_BYTES:
        return None  # no provider's error object is this large
    try:
        body = json.loads(body)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else None


def retry_after_seconds(header: str | None, now: float | None = None) -> float | None:
    """The seconds a Retry-After header asks for (delta-seconds or an HTTP-date), None when absent or unusable.

    Only a finite number >= 0 counts: `inf`, `nan` or `-5` from an upstream is treated as no header.
    """
    if header is None:
        return None
    text = header.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            date = email.utils.parsedate_tz(text)
            seconds = None if date is None else email.utils.mktime_tz(date) - (time.time() if now is None else now)
        except (TypeError, ValueError, OverflowError):
            return None
        if seconds is None:
            return None
        seconds = max(0.0, seconds)  # a date in the past: retry now
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def build_retry(*, retries: int, backoff_factor: float, backoff_max: float, retry_after_max: float,
                read: int = 0, methods: frozenset[str] = frozenset({"GET", "POST"})) -> Retry:
    """Every field set on purpose; the library defaults are wrong for a POST-heavy LLM gateway.

    ``read``: retries after a read error, 0 by default: a chat upstream may already be generating (and billing)
    the answer. An embedding, cheap and without side effects, may be asked again.
    """
    return UpstreamRetry(
        total=retries,
        connect=retries,
        read=read,
        status=retries,
        other=0,
        redirect=0,
        allowed_methods=methods,
        status_forcelist=RETRY_STATUSES,
        backoff_factor=backoff_factor,
        backoff_jitter=backoff_factor,
        backoff_max=backoff_max,
        respect_retry_after_header=True,
        retry_after_max=int(retry_after_max),
        raise_on_status=False,
        raise_on_redirect=False,
    )


def build_session(*, retry: Retry, pool_size: int, hosts: int = 1, trust_env: bool = False) -> requests.Session:
    """A session whose pool holds one connection per concurrent request of this worker, for each host.

    ``trust_env`` False (the upstreams): no proxy or netrc surprises from the worker's environment.
    """
    session = requests.Session()
    adapter = OneWriteAdapter(pool_connections=max(4, hosts), pool_maxsize=pool_size, max_retries=retry,
                              pool_block=False)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.trust_env = trust_env
    return session
