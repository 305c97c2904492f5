"""The upstream Retry policy, the URL join and the mapping of requests' errors to gateway errors."""

from __future__ import annotations

import email.utils
import time

import pytest
from urllib3 import HTTPResponse
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError, ReadTimeoutError

from app.errors import UpstreamTimeout, UpstreamUnreachable
from app.upstream.client import _map_send_error
from app.upstream.connection import upstream_url as _url
from app.upstream.http import RETRY_STATUSES, UpstreamRetry, build_retry, build_session


def retry(**overrides: float) -> UpstreamRetry:
    args = {"retries": 3, "backoff_factor": 0.5, "backoff_max": 8.0, "retry_after_max": 10.0, **overrides}
    built = build_retry(**args)
    assert isinstance(built, UpstreamRetry)
    return built


def response(status: int, **headers: str) -> HTTPResponse:
    return HTTPResponse(body=b"{}", status=status, headers=headers, preload_content=False)


def test_build_retry_sets_every_field_on_purpose() -> None:
    """POST is retried on 429/5xx with jittered, capped backoff, Retry-After honoured and capped, never raising."""
    r = retry(retries=2, backoff_factor=0.25, backoff_max=4.0, retry_after_max=7.0)
    assert (r.total, r.connect, r.status) == (2, 2, 2)
    assert r.read == 0  # the upstream may already be generating: a read error is not retried
    assert r.other == 0 and r.redirect == 0
    assert "POST" in r.allowed_methods and "GET" in r.allowed_methods
    assert set(r.status_forcelist) == set(RETRY_STATUSES) == {429, 500, 502, 503, 504}
    assert r.backoff_factor == 0.25 and r.backoff_jitter == 0.25 and r.backoff_max == 4.0
    assert r.respect_retry_after_header is True
    assert r.retry_after_max == 7
    assert r.raise_on_status is False and r.raise_on_redirect is False


def test_post_on_503_is_retried() -> None:
    """A POST answered 503 counts as a retry, not a final answer."""
    r = retry()
    assert r.is_retry("POST", 503, has_retry_after=False)
    assert not r.is_retry("POST", 400, has_retry_after=False)
    assert len(r.increment("POST", "/v1/chat/completions", response=response(503)).history) == 1


def test_short_retry_after_is_waited_for() -> None:
    """A 429 with Retry-After within the cap is retried after that many seconds."""
    r = retry(retry_after_max=10.0)
    resp = response(429, **{"Retry-After": "2"})
    after = r.increment("POST", "/v1/chat/completions", response=resp)
    assert len(after.history) == 1
    assert after.get_retry_after(resp) == 2


def test_retry_after_above_the_cap_gives_up_at_once() -> None:
    """A 429 asking for longer than the cap is handed back at once instead of sleeping on the same key."""
    r = retry(retry_after_max=10.0)
    with pytest.raises(MaxRetryError):
        r.increment("POST", "/v1/chat/completions", response=response(429, **{"Retry-After": "60"}))


@pytest.mark.parametrize("header", ["nan", "inf", "-1", "1.5e", "soon", ""])
def test_unusable_retry_after_falls_back_to_the_backoff(header: str) -> None:
    """A 429 whose Retry-After is no usable number is retried after the backoff, never failing the request."""
    r = retry(backoff_factor=0.001, backoff_max=0.01)
    resp = response(429, **{"Retry-After": header})
    after = r.increment("POST", "/v1/chat/completions", response=resp)
    assert len(after.history) == 1
    assert after.get_retry_after(resp) is None
    after.sleep(resp)  # urllib3's own parser raises InvalidHeader here, which failed the whole request


def test_retry_after_as_a_date_beyond_the_cap_gives_up_at_once() -> None:
    """An HTTP-date Retry-After further away than the cap is handed back at once, like a number would be."""
    r = retry(retry_after_max=10.0)
    date = email.utils.formatdate(time.time() + 60, usegmt=True)
    with pytest.raises(MaxRetryError):
        r.increment("POST", "/v1/chat/completions", response=response(429, **{"Retry-After": date}))


def test_retries_run_out() -> None:
    """After `retries` status retries the next one is exhausted."""
    r = retry(retries=2)
    for _ in range(2):
        r = r.increment("POST", "/x", response=response(500))
    with pytest.raises(MaxRetryError):
        r.increment("POST", "/x", response=response(500))


def test_session_pool_is_sized_and_ignores_the_environment() -> None:
    """The session's adapters keep `pool_size` connections per host and read no proxy settings."""
    session = build_session(retry=retry(), pool_size=500)
    adapter = session.get_adapter("http://upstream/v1/chat/completions")
    assert adapter._pool_maxsize == 500
    assert adapter.max_retries.total == 3
    assert session.trust_env is False


@pytest.mark.parametrize(("base", "path", "expected"), [
    ("https://api.deepseek.com", "/v1/chat/completions", "https://api.deepseek.com/v1/chat/completions"),
    ("https://api.openai.com/v1", "/v1/chat/completions", "https://api.openai.com/v1/chat/completions"),
    ("http://127.0.0.1:9100/openai/v1", "/v1/embeddings", "http://127.0.0.1:9100/openai/v1/embeddings"),
    ("http://127.0.0.1:9100/v1", "/v1/models", "http://127.0.0.1:9100/v1/models"),
])
def test_url_does_not_double_v1(base: str, path: str, expected: str) -> None:
    """TARGET_URL with or without a trailing /v1 gives one /v1 in the upstream URL."""
    assert _url(base, path) == expected


def test_timeouts_map_to_504_and_connection_failures_to_502() -> None:
    """Read and connect timeouts are 504; refused connections are 502."""
    read_timeout = MaxRetryError(None, "/x", ReadTimeoutError(None, "/x", "timed out"))
    assert isinstance(_map_send_error(read_timeout), UpstreamTimeout)
    assert isinstance(_map_send_error(ReadTimeoutError(None, "/x", "timed out")), UpstreamTimeout)
    assert isinstance(_map_send_error(MaxRetryError(None, "/x", ConnectTimeoutError("slow"))), UpstreamTimeout)
    refused = MaxRetryError(None, "/x", NewConnectionError(None, "refused"))
    error = _map_send_error(refused)
    assert isinstance(error, UpstreamUnreachable) and error.status == 502
