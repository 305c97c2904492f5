"""The gunicorn worker class: gunicorn's own gevent worker, extended (its bounded reads and error answers are
tested end to end in tests/integration)."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.support import load_gunicorn_conf


@pytest.fixture(scope="module")
def conf() -> ModuleType:
    return load_gunicorn_conf("gunicorn_conf_under_test")


def test_the_worker_class_is_gunicorns_gevent_worker(conf: ModuleType) -> None:
    from gunicorn.workers.ggevent import GeventWorker

    assert issubclass(conf.worker_class, GeventWorker)


class _Recorder:
    """A socket that records what each sendall carried."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def fileno(self) -> int:
        return -1


HEAD_SIZED = b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
HEAD_STREAM = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _socket(conf: ModuleType) -> tuple[object, _Recorder]:
    raw = _Recorder()
    return conf._ReadDeadlineSocket(raw, {"keepalive": 5, "head": 5, "body": 5, "idle": 5}, conf._Crowd(100)), raw


def test_a_sized_answer_leaves_head_and_body_in_one_send(conf: ModuleType) -> None:
    sock, raw = _socket(conf)
    sock.expect_response(True)
    sock.sendall(HEAD_SIZED)
    assert raw.sent == []  # held for the body
    sock.sendall(b"{}")
    assert raw.sent == [HEAD_SIZED + b"{}"]
    sock.sendall(b"more")  # later writes go as they come
    assert raw.sent[-1] == b"more"


@pytest.mark.parametrize("head", [
    HEAD_STREAM,  # a stream's head must leave when the upstream's did, before any event
    b"HTTP/1.1 204 No Content\r\nServer: gunicorn\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\n\r\n",
])
def test_a_head_without_a_sized_body_leaves_at_once(conf: ModuleType, head: bytes) -> None:
    sock, raw = _socket(conf)
    sock.expect_response(True)
    sock.sendall(head)
    assert raw.sent == [head]


def test_a_held_head_goes_out_before_any_other_use_of_the_socket(conf: ModuleType) -> None:
    sock, raw = _socket(conf)
    sock.expect_response(True)
    sock.sendall(HEAD_SIZED)
    sock.fileno()
    assert raw.sent == [HEAD_SIZED]
    sock.flush()
    assert raw.sent == [HEAD_SIZED]  # sent once


def test_only_a_response_head_is_held(conf: ModuleType) -> None:
    """A HEAD request's head (no body follows) and writes outside a response (gunicorn's error pages) go at once."""
    sock, raw = _socket(conf)
    sock.expect_response(False)
    sock.sendall(HEAD_SIZED)
    sock.sendall(HEAD_SIZED + b"{}")
    assert raw.sent == [HEAD_SIZED, HEAD_SIZED + b"{}"]


def test_a_large_body_is_not_copied_to_join_its_head(conf: ModuleType) -> None:
    """Past _JOIN_MAX_BYTES the head goes first and the body as it is: one more send, no copy of megabytes."""
    sock, raw = _socket(conf)
    sock.expect_response(True)
    sock.sendall(HEAD_SIZED)
    body = b"x" * (conf._JOIN_MAX_BYTES + 1)
    sock.sendall(body)
    assert raw.sent == [HEAD_SIZED, body]
