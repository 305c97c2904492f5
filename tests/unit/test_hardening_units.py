"""Issue 12's pure parts: key scrubbing, usage read from the end of a large answer, the worker's read limits,
gunicorn's refusals as JSON, duplicate keys and the bound on `n`."""

from __future__ import annotations

import json
import socket
import time
from types import ModuleType

import pytest

from app.api import CHAT
from app.errors import BadRequest
from app.proxy.routes import _usage_at_end
from app.proxy.validation import parse_request
from app.upstream.scrub import KeyScrubber
from tests.support import load_gunicorn_conf

KEY = "sk-proj-Q2x9LmT4vB7nW1cZ8kR5yH3a"


@pytest.fixture(scope="module")
def conf() -> ModuleType:
    return load_gunicorn_conf("gunicorn_conf_hardening")


def test_scrubber_cuts_whole_keys_and_their_tails() -> None:
    """The key, and the tails providers print (`...yH3a`), are masked; other text stays."""
    scrub = KeyScrubber([KEY, "sk-other-9f8e7d6c5b4a"]).scrub
    body = f'{{"error":{{"message":"bad key {KEY}; also sk-proj-****{KEY[-4:]} and ...{KEY[-8:]}. ok"}}}}'
    out = scrub(body.encode()).decode()
    assert KEY not in out and KEY[-4:] not in out and KEY[-8:] not in out
    assert out == '{"error":{"message":"bad key ***; also sk-proj-******* and ...***. ok"}}'
    assert scrub(b"sk-other-9f8e7d6c5b4a") == b"***"
    assert scrub(b"a word like yH3aXYZ stays") == b"a word like yH3aXYZ stays"  # not where a key would end


def test_scrubber_without_keys_changes_nothing() -> None:
    assert KeyScrubber([]).scrub(b"anything") == b"anything"


def test_usage_is_read_from_the_end_without_parsing_the_rest() -> None:
    answer = {"id": "x", "choices": [{"message": {"content": 'says "usage": 5 ' * 10}}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}}
    assert _usage_at_end(json.dumps(answer).encode()) == answer["usage"]
    assert _usage_at_end(b'{"data": [1, 2]}') is None
    assert _usage_at_end(b'{"usage": ') is None


def test_duplicate_read_fields_are_refused() -> None:
    """Item 7: `model` (or `stream`, `n`, ...) twice at the top level is a 400; elsewhere duplicates pass."""
    with pytest.raises(BadRequest) as caught:
        parse_request(CHAT, b'{"model":"a","messages":[{"role":"user","content":"x"}],"model":"b"}')
    assert caught.value.code == "duplicate_key"
    with pytest.raises(BadRequest):
        parse_request(CHAT, b'{"model":"a","stream":false,"messages":[{"role":"user","content":"x"}],"stream":true}')
    ok = parse_request(CHAT, b'{"model":"a","messages":[{"role":"user","content":"x"}],'
                             b'"metadata":{"model":"m","model":"n"}}')
    assert ok.model == "a"


@pytest.mark.parametrize("n", [129, 2**63])
def test_n_is_bounded(n: int) -> None:
    body = json.dumps({"model": "a", "messages": [{"role": "user", "content": "x"}], "n": n}).encode()
    with pytest.raises(BadRequest):
        parse_request(CHAT, body)
    assert parse_request(CHAT, body.replace(str(n).encode(), b"128")).body["n"] == 128


def test_an_idle_body_read_times_out(conf: ModuleType) -> None:
    """While a body is read, a silent client raises TimeoutError after the idle limit (the app answers 408)."""
    server, client = socket.socketpair()
    try:
        sock = conf._ReadDeadlineSocket(server, {"keepalive": 5, "head": 5, "body": 5, "idle": 0.2},
                                        conf._Crowd(100))
        sock.read_body()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            sock.recv(10)
        assert 0.15 < time.monotonic() - started < 1
        sock.read_body()  # the next request's body: bytes every 0.15 s keep it alive past the 0.2 s idle limit
        for _ in range(3):
            client.sendall(b"b")
            assert sock.recv(10) == b"b"
            time.sleep(0.15)
    finally:
        server.close()
        client.close()


def test_a_started_head_has_a_deadline_and_a_quiet_connection_closes_silently(conf: ModuleType) -> None:
    server, client = socket.socketpair()
    try:
        sock = conf._ReadDeadlineSocket(server, {"keepalive": 0.2, "head": 0.3, "body": 5, "idle": 5},
                                        conf._Crowd(100))
        with pytest.raises(conf._KeepAliveExpired):
            sock.recv(10)  # nothing sent: the keep-alive wait ends
        sock.wait_for_request()
        client.sendall(b"GET / HT")
        assert sock.recv(10) == b"GET / HT"
        time.sleep(0.35)
        with pytest.raises(conf.RequestReadTimeout):
            sock.recv(10)  # the head's deadline passed
    finally:
        server.close()
        client.close()


def test_a_crowded_worker_cuts_waiting_and_slow_heads_short(conf: ModuleType) -> None:
    """With half the worker's connections open, an idle connection gets 1 s and a head 2 s, not 10 s."""
    crowd = conf._Crowd(10)
    crowd.open = 5
    limits = {"keepalive": 10, "head": 10, "body": 60, "idle": 10}
    server, client = socket.socketpair()
    try:
        sock = conf._ReadDeadlineSocket(server, limits, crowd)
        started = time.monotonic()
        with pytest.raises(conf._KeepAliveExpired):
            sock.recv(10)
        assert 0.9 < time.monotonic() - started < 1.6
        sock.wait_for_request()
        client.sendall(b"P")
        sock.recv(10)
        started = time.monotonic()
        with pytest.raises(conf.RequestReadTimeout):
            while True:  # a byte every 0.5 s keeps it from being idle, not from its 2 s allowance
                client.sendall(b"O")
                sock.recv(10)
                time.sleep(0.5)
        assert time.monotonic() - started < 3
    finally:
        server.close()
        client.close()


@pytest.mark.parametrize(("name", "status"), [
    ("LimitRequestLine", 414), ("LimitRequestHeaders", 431), ("InvalidRequestLine", 400),
    ("InvalidChunkSize", 400), ("RequestReadTimeout", 408), ("UnsupportedTransferCoding", 501),
])
def test_gunicorn_refusals_become_openai_json(conf: ModuleType, name: str, status: int) -> None:
    exc = type(name, (Exception,), {})()
    answer = conf.refusal(exc)
    assert answer is not None and answer[0] == status
    raw = conf.error_response(*answer)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status) and b"Connection: close" in head
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


def test_an_app_failure_is_not_a_refusal(conf: ModuleType) -> None:
    assert conf.refusal(RuntimeError("bug")) is None
