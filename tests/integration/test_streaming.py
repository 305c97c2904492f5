"""Streaming through a real gateway: no buffering, broken upstream streams, clients that leave."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from tests.support import Gateway, MockUpstream, base_env

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

WORDS = " ".join(f"w{i}" for i in range(8))  # 11 content chunks (with "Mock answer to:"), role, finish


def chat(text: str = WORDS, **fields: object) -> dict:
    return {"model": "mock-gpt", "stream": True, "messages": [{"role": "user", "content": text}], **fields}


def events(lines: Iterator[bytes]) -> Iterator[object]:
    for line in lines:
        if line.startswith(b"data: "):
            payload = line[len(b"data: "):]
            yield "[DONE]" if payload == b"[DONE]" else json.loads(payload)


def established(port: int) -> int:
    """How many loopback TCP connections to `port` are open (kernel's view, both ends counted once)."""
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as table:
                rows = table.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":  # the upstream's end, ESTABLISHED
                count += 1
    return count


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, UPSTREAM_API_KEYS=f"sk-stream-{uuid.uuid4().hex}",
                          CACHE_ENABLED="false"))
    yield gw
    gw.stop()


def stream(gw: Gateway, body: dict, **kwargs: object) -> requests.Response:
    response = requests.post(gw.url + "/v1/chat/completions", json=body, stream=True, timeout=30, **kwargs)
    assert response.status_code == 200
    return response


def test_chunks_arrive_as_the_upstream_sends_them(gateway: Gateway, upstream: MockUpstream) -> None:
    """With 0.3 s between upstream chunks, the first content reaches the client long before the end."""
    upstream.faults({"kind": "slow_chunks", "delay": 0.3})
    started = time.monotonic()
    first_content = None
    text = ""
    with stream(gateway, chat()) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Accel-Buffering"] == "no"
        for event in events(response.iter_lines()):
            if event == "[DONE]":
                break
            delta = event["choices"][0]["delta"].get("content")
            if delta and first_content is None:
                first_content = time.monotonic() - started
            text += delta or ""
    total = time.monotonic() - started
    assert text == "Mock answer to: " + WORDS
    assert total > 3.0  # 13 gaps of 0.3 s: the upstream took its time
    assert first_content is not None and first_content < total - 2.0


def test_upstream_reset_mid_stream_ends_with_an_error_event(gateway: Gateway, upstream: MockUpstream) -> None:
    """An upstream connection reset after 3 chunks: the client gets them, then an error event, no [DONE]."""
    upstream.faults({"kind": "reset", "after_chunks": 3})
    request_id = f"reset-{uuid.uuid4().hex}"
    with stream(gateway, chat(), headers={"X-Request-ID": request_id}) as response:
        received = list(events(response.iter_lines()))
    assert "[DONE]" not in received
    chunks, last = received[:-1], received[-1]
    assert len(chunks) == 3 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert isinstance(last["error"]["message"], str) and isinstance(last["error"]["type"], str)
    time.sleep(0.2)
    (line,) = [line for line in gateway.request_lines() if line["request_id"] == request_id]
    assert line["error"]
    assert "Traceback" not in gateway.logs()


def test_client_disconnect_closes_the_upstream_stream(upstream_server: MockUpstream) -> None:
    """A client leaving mid-stream makes the gateway drop its upstream connection and log the request at once."""
    upstream = MockUpstream()  # its own port, so only this test's connections are counted
    gw = Gateway(base_env(upstream, UPSTREAM_API_KEYS=f"sk-leave-{uuid.uuid4().hex}", CACHE_ENABLED="false"))
    try:
        upstream.faults({"kind": "slow_chunks", "delay": 0.5})  # 14 chunks: about 7 s when read to the end
        request_id = f"leave-{uuid.uuid4().hex}"
        response = stream(gw, chat(), headers={"X-Request-ID": request_id})
        lines = response.iter_lines()
        next(event for event in events(lines) if event != "[DONE]")
        assert established(upstream.port) == 1  # the gateway is reading the upstream's stream
        left = time.monotonic()
        response.close()
        deadline = left + 3.0
        while established(upstream.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert established(upstream.port) == 0, "the gateway kept reading the upstream after the client left"
        line = None
        while line is None and time.monotonic() < deadline:
            line = next((x for x in gw.request_lines() if x["request_id"] == request_id), None)
            time.sleep(0.05)
        assert line is not None and line["latency_ms"] < 4000
        assert requests.post(gw.url + "/v1/chat/completions", json=chat(stream=False), timeout=10).status_code == 200
    finally:
        gw.stop()
        upstream.stop()
