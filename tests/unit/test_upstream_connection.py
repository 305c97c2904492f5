"""Upstream connections write a request's head and body with one send, and the bytes are unchanged."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from urllib3.connection import HTTPConnection

from app.upstream.connection import _OneWrite


class CountingConnection(HTTPConnection):
    """urllib3's connection, counting the writes that reach the socket."""

    writes: list[bytes]

    def send(self, data: Any) -> None:
        self.writes.append(bytes(data))
        super().send(data)


class OneWriteCounting(_OneWrite, CountingConnection):
    pass


@pytest.fixture
def wire() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    right.settimeout(2)
    yield left, right
    left.close()
    right.close()


def sent(cls: type[CountingConnection], wire: tuple[socket.socket, socket.socket], method: str,
         body: Any) -> tuple[list[bytes], bytes]:
    left, right = wire
    conn = cls("upstream.test", 80)
    conn.writes = []
    conn.sock = left
    conn.request(method, "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    right.setblocking(False)
    received = b""
    while True:
        try:
            received += right.recv(65536)
        except BlockingIOError:
            return conn.writes, received


@pytest.mark.parametrize(("method", "body"), [
    ("POST", b'{"model": "m", "messages": []}'),
    ("GET", None),
])
def test_one_write_per_request_and_the_same_bytes(wire: tuple[socket.socket, socket.socket], method: str,
                                                  body: bytes | None) -> None:
    plain_writes, plain_bytes = sent(CountingConnection, wire, method, body)
    one_writes, one_bytes = sent(OneWriteCounting, wire, method, body)
    assert len(plain_writes) == (2 if body else 1)
    assert len(one_writes) == 1
    assert one_bytes == plain_bytes and one_bytes.startswith(f"{method} /v1/chat/completions HTTP/1.1".encode())
    if body:
        assert one_bytes.endswith(b"\r\n\r\n" + body)


def test_a_chunked_body_is_still_framed(wire: tuple[socket.socket, socket.socket]) -> None:
    """A body of unknown length (an iterator) goes out chunked, its head in the first write."""
    writes, data = sent(OneWriteCounting, wire, "POST", iter([b"ab", b"cd"]))
    assert b"Transfer-Encoding: chunked" in writes[0]
    assert data.endswith(b"\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n")


def test_is_connected_tells_a_live_connection_from_a_dropped_one(wire: tuple[socket.socket, socket.socket]) -> None:
    """The pooled-connection check: idle and open is connected; closed by the peer, or holding unread bytes
    (a late answer to a request that was given up on), is not, so urllib3 opens a fresh one."""
    left, right = wire
    conn = OneWriteCounting("upstream.test", 80)
    assert not conn.is_connected  # never connected
    conn.sock = left
    assert conn.is_connected
    right.sendall(b"HTTP/1.1 200 OK\r\n")
    assert not conn.is_connected
    left.recv(100)
    assert conn.is_connected
    right.close()
    assert not conn.is_connected


def test_a_body_that_fails_before_its_first_chunk_raises_its_own_error(
        wire: tuple[socket.socket, socket.socket]) -> None:
    """Nothing half-written is sent afterwards, and the caller sees the body's error, not a send error."""
    def broken_body() -> Iterator[bytes]:
        raise RuntimeError("body source failed")
        yield b""  # pragma: no cover - makes this a generator

    left, right = wire
    conn = OneWriteCounting("upstream.test", 80)
    conn.writes = []
    conn.sock = left
    with pytest.raises(RuntimeError, match="body source failed"):
        conn.request("POST", "/v1/chat/completions", body=broken_body())
    assert conn.writes == [] and conn._held == b""
