"""A streamed answer as the relay reads it (`UpstreamResult.iter_raw`, with `connection.arrived`): HTTP chunks that
arrived together come out as one piece (one write to the client), bytes still to come are never waited for, what
arrived before a stall still comes out, and it all holds over TLS as over plain TCP."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from urllib3 import HTTPResponse
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util import Retry, Timeout

from app.errors import UpstreamTimeout
from app.upstream.client import JOIN_MAX_BYTES, UpstreamResult
from tests.support import missing_tool

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
END = b"0\r\n\r\n"
GATE_SECONDS = 5.0


def event(n: int, size: int = 0) -> bytes:
    return b'data: {"n": %d, "pad": "%s"}\n\n' % (n, b"x" * size)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Scripted:
    """A loopback upstream answering one request with a chunked body sent in bursts: one `sendall` per burst,
    each burst after the test opens its gate (the first goes at once)."""

    def __init__(self, bursts: list[bytes], tls: ssl.SSLContext | None = None) -> None:
        self.bursts = bursts
        self.gates = [threading.Event() for _ in bursts]
        self.gates[0].set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.tls = tls
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        if self.tls is not None:
            conn = self.tls.wrap_socket(conn, server_side=True)
        with conn:
            request = b""
            while b"\r\n\r\n" not in request or len(request) < request.index(b"\r\n\r\n") + 6:
                request += conn.recv(65536)  # the head and its 2-byte body: nothing unread to reset the close
            conn.sendall(HEAD)
            try:
                for gate, burst in zip(self.gates, self.bursts, strict=True):
                    if not gate.wait(GATE_SECONDS):
                        return
                    conn.sendall(burst)
                conn.settimeout(GATE_SECONDS)
                conn.recv(1)  # closed after the client, which has read everything by then
            except OSError:  # the client gave up (the stall test)
                return

    def close(self) -> None:
        for gate in self.gates:
            gate.set()
        self.listener.close()


def result(response: HTTPResponse) -> UpstreamResult:
    return UpstreamResult(status=200, content_type="text/event-stream", response=response, backend="test",
                          key_id="test", retries=0, upstream_ms=0.0)


def answer(pool: HTTPConnectionPool) -> UpstreamResult:
    response = pool.urlopen("POST", "/v1/chat/completions", body=b"{}", retries=Retry(0),
                            timeout=Timeout(connect=2, read=1.0), preload_content=False)
    assert response.status == 200 and response.chunked
    return result(response)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made for this run by the openssl command (.ci/run installs it)."""
    if shutil.which("openssl") is None:
        missing_tool("openssl is not installed (apt-get install openssl)")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(params=["tcp", "tls"])
def connect(request: pytest.FixtureRequest) -> Iterator:
    """Starts a Scripted upstream and opens its answer, over plain TCP or TLS."""
    started: list[Scripted] = []

    def start(bursts: list[bytes]) -> tuple[Scripted, UpstreamResult]:
        if request.param == "tcp":
            upstream = Scripted(bursts)
            pool: HTTPConnectionPool = HTTPConnectionPool("127.0.0.1", upstream.port)
        else:
            cert, key = request.getfixturevalue("certificate")
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert, key)
            upstream = Scripted(bursts, tls=context)
            pool = HTTPSConnectionPool("127.0.0.1", upstream.port, cert_reqs="CERT_REQUIRED", ca_certs=str(cert))
        started.append(upstream)
        return upstream, answer(pool)

    yield start
    for upstream in started:
        upstream.close()


def test_events_that_arrived_together_come_out_as_one_piece_and_nothing_waits_for_the_rest(connect) -> None:  # noqa: ANN001
    upstream, answer = connect([chunk(event(1)) + chunk(event(2)) + chunk(event(3)),
                                chunk(event(4)) + chunk(event(5)) + END])
    pieces = answer.iter_raw()
    assert next(pieces) == event(1) + event(2) + event(3)  # the second burst is still held by the upstream
    upstream.gates[1].set()
    assert list(pieces) == [event(4) + event(5)]


def test_events_are_not_held_for_a_chunk_that_has_only_begun_to_arrive(connect) -> None:  # noqa: ANN001
    """Event 2's size line (or its first bytes) came with event 1; its data follows later: event 1 goes at once."""
    upstream, answer = connect([chunk(event(1)) + chunk(event(2))[:4], chunk(event(2))[4:] + END])
    pieces = answer.iter_raw()
    started = time.monotonic()
    assert next(pieces) == event(1)
    assert time.monotonic() - started < 0.5  # the read timeout is 1 s; the rest of event 2 is held by the upstream
    upstream.gates[1].set()
    assert list(pieces) == [event(2)]


def test_what_arrived_before_a_stall_comes_out_before_the_timeout(connect) -> None:  # noqa: ANN001
    """Event 2's first bytes arrived but not the rest, and the upstream stops: event 1 still reaches the client,
    at once, and the stall ends in a timeout."""
    two = chunk(event(2))
    _, answer = connect([chunk(event(1)) + two[:9], two[9:] + END])
    pieces = answer.iter_raw()
    started = time.monotonic()
    assert next(pieces) == event(1)
    assert time.monotonic() - started < 0.5
    with pytest.raises(UpstreamTimeout):
        next(pieces)


def test_a_large_burst_leaves_joined_in_bounded_pieces(connect) -> None:  # noqa: ANN001
    events = [event(n, 2000) for n in range(100)]
    _, answer = connect([b"".join(chunk(e) for e in events) + END])
    pieces = list(answer.iter_raw())
    assert b"".join(pieces) == b"".join(events)
    assert 1 < len(pieces) < len(events) / 2  # joined, several events a piece
    assert all(len(piece) < JOIN_MAX_BYTES + len(events[0]) for piece in pieces)
