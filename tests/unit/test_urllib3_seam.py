"""What app/upstream/connection.py relies on in urllib3 and requests, beneath their public API: if an upgrade
changes any of it, these fail before the gateway quietly loses its fast path (or its retries)."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.util import Timeout

from app.upstream import connection, heads
from app.upstream.client import retry_reasons
from app.upstream.connection import DirectPools, OneWriteHTTPConnection, OneWriteHTTPConnectionPool
from app.upstream.http import build_retry, build_session


class Upstream:
    """A loopback HTTP/1.1 server answering a queue of statuses (then 200), recording each request's body."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.bodies: list[bytes] = []
        self.peers: set[int] = set()


@pytest.fixture()
def upstream() -> Iterator[tuple[Upstream, str]]:
    state = Upstream()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            state.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            state.peers.add(self.client_address[1])
            status = state.statuses.pop(0) if state.statuses else 200
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def session() -> Any:
    return build_session(retry=build_retry(retries=2, backoff_factor=0.0, backoff_max=0.0, retry_after_max=1.0),
                         pool_size=4)


def test_the_pool_manager_builds_the_one_write_pools() -> None:
    """urllib3's PoolManager picks a pool class from `pool_classes_by_scheme`, which the adapter replaces."""
    pool = session().get_adapter("http://upstream.test").poolmanager.connection_from_url("http://upstream.test")
    assert isinstance(pool, OneWriteHTTPConnectionPool)
    assert pool.ConnectionCls is OneWriteHTTPConnection


def test_a_pooled_connection_is_checked_through_is_connected() -> None:
    """Before reusing a pooled connection urllib3 asks its `is_connected`, the property the seam overrides."""
    pool = HTTPConnectionPool("upstream.test", 80, maxsize=1)

    class Dropped(OneWriteHTTPConnection):
        closed = False

        @property
        def is_connected(self) -> bool:
            return False

        def close(self) -> None:
            self.closed = True

    dropped = Dropped("upstream.test", 80)
    dropped.sock = object()  # type: ignore[assignment] - only its presence matters to urllib3's check
    pool.pool.get()  # the pool's one empty slot...
    pool.pool.put(dropped)  # ...now holds the dropped connection
    assert pool._get_conn() is dropped and dropped.closed


def test_a_pool_the_manager_forgets_stays_usable(upstream: tuple[Upstream, str]) -> None:
    """DirectPools keeps each backend's pool: urllib3's manager does not close the pools it drops (clear, eviction
    past `pool_connections`), so the one kept still serves; only a pool closed itself reads `pool` None."""
    state, url = upstream
    built = session()
    pools = DirectPools(built)
    for body in (b'{"a":1}', b'{"a":2}'):
        answer = pools.urlopen("POST", url, "/v1/chat/completions", body=body, headers={}, retries=pools.retry(url),
                               timeout=Timeout(connect=2, read=2))
        assert answer.status == 200 and answer.read() == b"{}"
        answer.release_conn()
        kept = pools._routes[url][0]
        built.get_adapter(url).poolmanager.clear()
        assert kept.pool is not None
    assert state.bodies == [b'{"a":1}', b'{"a":2}']
    kept.close()
    assert kept.pool is None


def test_urlopen_retries_and_the_answer_keeps_its_history(upstream: tuple[Upstream, str]) -> None:
    """The adapter's Retry applies to a direct urlopen, and the answer carries `retries.history` (retry_reasons)."""
    state, url = upstream
    state.statuses = [503, 429]
    pools = DirectPools(session())
    answer = pools.urlopen("POST", url, "/v1/chat/completions", body=b"{}", headers={}, retries=pools.retry(url),
                           timeout=Timeout(connect=2, read=2))
    assert answer.status == 200
    assert retry_reasons(answer) == ["5xx", "429"]
    assert len(state.bodies) == 3


def test_a_live_connection_is_reused(upstream: tuple[Upstream, str]) -> None:
    """The unpatched-poll `is_connected` says a live idle connection is connected, so it is reused, not reopened."""
    state, url = upstream
    pools = DirectPools(session())
    for _ in range(3):
        answer = pools.urlopen("POST", url, "/v1/x", body=b"{}", headers={}, retries=pools.retry(url),
                               timeout=Timeout(connect=2, read=2))
        answer.read()
        answer.release_conn()
    assert len(state.bodies) == 3 and len(state.peers) == 1


def test_every_switch_is_on() -> None:
    """The side-by-side switches are for measuring only: the gateway ships with every fast path on."""
    assert connection.ONE_WRITE is True and connection.DIRECT_URLOPEN is True and connection.PLAIN_HEADS is True


def test_http_client_reads_the_head_parser_from_its_module(upstream: tuple[Upstream, str]) -> None:
    """`HTTPResponse.begin` looks `parse_headers` up in http.client's module at each call, which is where the seam
    puts the plain-head parser: an answer's head goes through it, and its headers come out as sent. (The test
    server's http.server parses the request's head with it too: it is http.client's, process-wide.)"""
    _state, url = upstream
    assert "parse_headers" in http.client.HTTPResponse.begin.__code__.co_names
    assert http.client.parse_headers is heads.parse_headers
    seen: list[bytes] = []

    def spy(fp: Any, _class: Any = http.client.HTTPMessage) -> http.client.HTTPMessage:
        message = heads.parse_headers(fp, _class)
        seen.append(message.as_bytes())
        return message

    pools = DirectPools(session())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(http.client, "parse_headers", spy)
        answer = pools.urlopen("POST", url, "/v1/x", body=b"{}", headers={}, retries=pools.retry(url),
                               timeout=Timeout(connect=2, read=2))
    answer.read()
    answer.release_conn()
    assert [head for head in seen if b"Content-Type: application/json" in head]
    assert answer.headers["Content-Type"] == "application/json" and answer.headers["Content-Length"] == "2"
