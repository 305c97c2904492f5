"""The client address in the log line: X-Forwarded-For counts only when the peer is in TRUSTED_PROXIES."""

from __future__ import annotations

import http.client
import uuid
from collections.abc import Iterator

import pytest

from tests.support import Gateway, MockUpstream, base_env, wait_until

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]


@pytest.fixture(scope="module")
def untrusting(upstream_server: MockUpstream) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server))
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def trusting(upstream_server: MockUpstream) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, TRUSTED_PROXIES="127.0.0.1"))
    try:
        yield gw
    finally:
        gw.stop()


def logged_client(gw: Gateway, *forwarded_for: str) -> str | None:
    """Send one request with these X-Forwarded-For header lines (one line per value); the client it logged."""
    request_id = f"xff-{uuid.uuid4().hex}"
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.putrequest("GET", "/v1/models")
        conn.putheader("X-Request-ID", request_id)
        for value in forwarded_for:
            conn.putheader("X-Forwarded-For", value)
        conn.endheaders()
        response = conn.getresponse()
        response.read()
        assert response.status == 200
    finally:
        conn.close()

    def line() -> dict | None:
        found = [entry for entry in gw.request_lines() if entry.get("request_id") == request_id]
        return found[0] if found else None

    wait_until(lambda: line() is not None, 5, "the request's log line")
    return line()["client"]  # type: ignore[index]


def test_header_ignored_without_trusted_proxies(untrusting: Gateway, upstream: MockUpstream) -> None:
    """Without TRUSTED_PROXIES the peer (127.0.0.1) is logged, not the X-Forwarded-For value."""
    assert logged_client(untrusting, "203.0.113.9") == "127.0.0.1"


def test_header_believed_from_a_trusted_proxy(trusting: Gateway, upstream: MockUpstream) -> None:
    """With TRUSTED_PROXIES=127.0.0.1 the forwarded address is logged."""
    assert logged_client(trusting, "203.0.113.9") == "203.0.113.9"


def test_spoofed_leftmost_hop_is_not_believed(trusting: Gateway, upstream: MockUpstream) -> None:
    """With a client-supplied leftmost value, the nearest untrusted hop (the one the proxy saw) is logged."""
    assert logged_client(trusting, "198.51.100.7, 203.0.113.9") == "203.0.113.9"


def test_repeated_header_lines_count_as_one_list(trusting: Gateway, upstream: MockUpstream) -> None:
    """A proxy that adds its own X-Forwarded-For line after the client's: the last line's hop still wins."""
    assert logged_client(trusting, "198.51.100.7", "203.0.113.9") == "203.0.113.9"


def test_no_header_logs_the_peer(trusting: Gateway, upstream: MockUpstream) -> None:
    """A trusted peer sending no X-Forwarded-For is itself the client."""
    assert logged_client(trusting) == "127.0.0.1"

