"""An answer leaves as the upstream's does: a queued DeepSeek request's blank lines (plain) or keep-alive
comments (stream) reach the client at once, and the complete answer is still parsed and cached."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from tests.support import Gateway, MockUpstream, base_env

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

QUEUE = {"kind": "queue", "seconds": 3, "interval": 0.5}


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, UPSTREAM_API_KEYS=f"sk-firstbyte-{uuid.uuid4().hex}"))
    yield gw
    gw.stop()


def body(stream: bool) -> dict:
    return {"model": "deepseek-chat", "stream": stream,
            "messages": [{"role": "user", "content": f"queued {uuid.uuid4().hex}"}]}


def test_plain_answer_first_byte_leaves_with_the_upstreams(gateway: Gateway, upstream: MockUpstream) -> None:
    """A 3 s queue: the client's first byte comes within 100 ms of the upstream's; the JSON after the blank lines
    is the answer, and the same request is then a cache hit."""
    upstream.faults(QUEUE)
    request = body(False)
    with requests.post(gateway.url + "/v1/chat/completions", json=request, stream=True, timeout=30) as response:
        assert response.status_code == 200
        first = response.raw.read(1)
        first_at = time.time()
        rest = response.raw.read()
    (seen,) = upstream.requests()
    assert first == b"\n" and first_at - seen["t"] < 0.1
    answer = json.loads(first + rest)
    assert answer["choices"][0]["message"]["content"].startswith("Mock answer to: queued")
    assert time.time() - seen["t"] >= 2.9
    hit = requests.post(gateway.url + "/v1/chat/completions", json=request, timeout=10)
    assert hit.headers["X-Cache"] == "HIT" and hit.json()["choices"] == answer["choices"]


def test_stream_head_leaves_with_the_upstreams(gateway: Gateway, upstream: MockUpstream) -> None:
    """A queued stream: the head within 100 ms of the upstream's, keep-alive comments passed on, then the events."""
    upstream.faults(QUEUE)
    with requests.post(gateway.url + "/v1/chat/completions", json=body(True), stream=True, timeout=30) as response:
        head_at = time.time()
        assert response.status_code == 200
        text = response.raw.read().decode()
    (seen,) = upstream.requests()
    assert head_at - seen["t"] < 0.1
    assert text.startswith(": keep-alive\n\n")
    assert "data: [DONE]" in text and "Mock answer to: queued" in "".join(
        json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in text.split("\n\n")
        if e.startswith("data: {") and json.loads(e[6:])["choices"])


def test_stream_head_leaves_before_the_first_event(gateway: Gateway, upstream: MockUpstream) -> None:
    """An upstream that sends its head and then waits 2 s for the first event: the client has the head at once."""
    upstream.faults({**QUEUE, "seconds": 2, "silent": True})
    started = time.time()
    with requests.post(gateway.url + "/v1/chat/completions", json=body(True), stream=True, timeout=30) as response:
        head_after = time.time() - started
        assert response.status_code == 200
        response.close()
    assert head_after < 0.5
