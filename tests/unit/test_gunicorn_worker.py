"""The gunicorn worker's socket wrapper: a response's head leaves with its first body bytes, in one write."""

from __future__ import annotations

import socket
from types import ModuleType

import pytest

from tests.support import load_gunicorn_conf


@pytest.fixture(scope="module")
def conf() -> ModuleType:
    return load_gunicorn_conf("gunicorn_conf_under_test")


@pytest.fixture
def pair() -> tuple[socket.socket, socket.socket]:
    left, right = socket.socketpair()
    left.settimeout(2)
    right.settimeout(2)
    yield left, right
    left.close()
    right.close()


def received(sock: socket.socket) -> list[bytes]:
    """What arrived, one item per read: separate writes on a socketpair are read separately when drained."""
    sock.setblocking(False)
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


def test_head_and_body_go_out_in_one_write(conf: ModuleType, pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    wrapped = conf._HeadWithBodySocket(server)
    wrapped.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    assert received(client) == []  # held until the body
    wrapped.sendall(b"{}")
    assert received(client) == [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"]
    wrapped.sendall(b"next chunk")  # later writes go straight through
    assert received(client) == [b"next chunk"]


def test_a_response_without_body_is_flushed(conf: ModuleType, pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    wrapped = conf._HeadWithBodySocket(server)
    wrapped.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    wrapped.flush()
    wrapped.flush()
    assert received(client) == [b"HTTP/1.1 204 No Content\r\n\r\n"]


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\n\r\n",
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
])
def test_a_head_without_body_is_not_held(conf: ModuleType, pair: tuple[socket.socket, socket.socket],
                                         head: bytes) -> None:
    """Nothing follows it, so it leaves at once (not after the request's close steps)."""
    server, client = pair
    conf._HeadWithBodySocket(server).sendall(head)
    assert received(client) == [head]


def test_any_other_socket_use_sends_the_head_first(conf: ModuleType, pair: tuple[socket.socket, socket.socket]) -> None:
    """sendfile, shutdown, fileno...: the held head is written before the socket is used any other way."""
    server, client = pair
    wrapped = conf._HeadWithBodySocket(server)
    wrapped.sendall(b"HEAD")
    wrapped.send(b"-raw")
    assert b"".join(received(client)) == b"HEAD-raw"


def test_the_worker_class_is_gunicorns_gevent_worker(conf: ModuleType) -> None:
    from gunicorn.workers.ggevent import GeventWorker

    assert issubclass(conf.worker_class, GeventWorker)


def test_an_event_stream_head_is_not_held(conf: ModuleType, pair: tuple[socket.socket, socket.socket]) -> None:
    """A stream's head leaves at once: its first event may be seconds away (a request queued upstream)."""
    server, client = pair
    wrapped = conf._HeadWithBodySocket(server)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"
    wrapped.sendall(head)
    assert received(client) == [head]
