"""An upstream whose headers gunicorn would refuse to repeat: the client still gets a proper answer, and the
request's concurrency slot is given back (it once stayed held, renewed for ever)."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import requests

from tests.support import Gateway, base_env

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

ANSWER = json.dumps({"id": "chatcmpl-odd", "object": "chat.completion", "created": 1, "model": "m",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "odd"},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


@pytest.fixture(scope="module")
def odd_upstream() -> Iterator[SimpleNamespace]:
    """A raw HTTP/1.1 server answering every request with a control character in its Content-Type."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve(conn: socket.socket) -> None:
        with conn:
            data = b""
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
                head, sep, rest = data.partition(b"\r\n\r\n")
                if not sep:
                    continue
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(rest) < length:
                    continue
                data = rest[length:]
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\x01\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER))

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}")
    server.close()


@pytest.fixture(scope="module")
def gateway(odd_upstream: SimpleNamespace) -> Iterator[Gateway]:
    gw = Gateway(base_env(odd_upstream, RATE_LIMIT_CONCURRENCY="1", CACHE_ENABLED="false"))  # type: ignore[arg-type]
    yield gw
    gw.stop()


def test_odd_content_type_is_replaced_and_the_slot_comes_back(gateway: Gateway) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": f"odd {uuid.uuid4().hex}"}]}
    for _ in range(3):  # concurrency 1: a held slot would make the second one a 429
        response = requests.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"] == "application/json"
        assert response.json()["choices"][0]["message"]["content"] == "odd"
