"""Issue 12: slow clients, malformed framing and oversized answers against a real gunicorn.

Each test is one thing an attacker or a broken upstream did to the gateway, and what a user of it sees.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from tests.support import Gateway, MockUpstream, base_env, openai_error

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

MODEL = "mock-gpt"
KEY_A, KEY_B = "sk-tenant-a-" + uuid.uuid4().hex, "sk-tenant-b-" + uuid.uuid4().hex
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"


def chat_body(text: str) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}]}).encode()


def connect(gw: Gateway, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP answer off a raw socket: status, headers (lower-case names), body (by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def json_error(status: int, headers: dict[str, str], body: bytes) -> dict:
    assert headers.get("content-type") == "application/json", (status, headers, body)
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    assert b"Traceback" not in body and b"<html" not in body.lower()
    return error


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    gw = Gateway(base_env(
        upstream_server, AUTH_DISABLED="false", GATEWAY_API_KEYS=f"a:{KEY_A},b:{KEY_B}",
        REQUEST_HEADER_TIMEOUT="1.5", REQUEST_BODY_TIMEOUT="2", REQUEST_IDLE_TIMEOUT="1",
        MAX_BODY_BYTES="100000",
    ))
    yield gw
    gw.stop()


def auth(key: str) -> bytes:
    return f"Authorization: Bearer {key}\r\n".encode()


# -- item 1: reading a request is bounded ----------------------------------------------------------------------

def test_a_body_that_stops_arriving_gets_408(gateway: Gateway) -> None:
    """A valid key, half a body, then silence: a JSON 408 after REQUEST_IDLE_TIMEOUT, and the connection closes."""
    body = chat_body("never finished")
    with connect(gateway) as sock:
        started = time.monotonic()
        sock.sendall(HEAD + auth(KEY_A) + b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        status, headers, answer = read_answer(sock)
        waited = time.monotonic() - started
        assert status == 408
        assert json_error(status, headers, answer)["code"] == "request_timeout"
        assert headers.get("connection") == "close"
        assert sock.recv(10) == b""
    assert 0.8 < waited < 4


def test_a_trickled_body_is_cut_at_the_total_deadline(gateway: Gateway) -> None:
    """A byte every 0.4 s never trips the idle timeout; REQUEST_BODY_TIMEOUT (2 s) still ends it with 408."""
    body = chat_body("trickle " * 20)
    with connect(gateway) as sock:
        sock.sendall(HEAD + auth(KEY_A) + b"Content-Length: %d\r\n\r\n" % len(body))
        started = time.monotonic()
        sock.settimeout(0.4)
        answer = b""
        for byte in body:
            try:
                sock.sendall(bytes([byte]))
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if answer:
                break
            assert time.monotonic() - started < 6, "the trickle was never cut"
        sock.settimeout(5)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 4


def test_a_slow_request_head_gets_408_json(gateway: Gateway) -> None:
    """Half a request head and silence: gunicorn's side answers a JSON 408 too."""
    with connect(gateway) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n")
        status, headers, body = read_answer(sock)
        assert status == 408
        assert json_error(status, headers, body)["code"] == "request_timeout"


def test_a_huge_chunk_size_is_refused_at_once(gateway: Gateway) -> None:
    """A chunk declaring more than MAX_BODY_BYTES is a 400 at once, not a wait for bytes that never come."""
    with connect(gateway) as sock:
        started = time.monotonic()
        sock.sendall(HEAD + auth(KEY_A) + b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFF\r\n{\"mod")
        status, headers, body = read_answer(sock)
        assert status == 400
        assert json_error(status, headers, body)["code"] == "invalid_chunked_body"
        assert time.monotonic() - started < 0.9  # before any read timeout could have fired


@pytest.mark.parametrize("size", [b"ZZ", b"-1", b"0x10", b"1 2", b""])
def test_an_invalid_chunk_size_is_a_400(gateway: Gateway, size: bytes) -> None:
    """Item 7: a chunk size that is not hexadecimal is a JSON 400, never a 500 with a trace."""
    with connect(gateway) as sock:
        sock.sendall(HEAD + auth(KEY_A) + b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\nabc\r\n0\r\n\r\n")
        status, headers, body = read_answer(sock)
    assert status == 400, body
    assert json_error(status, headers, body)["type"] == "invalid_request_error"
    assert "Traceback" not in gateway.logs()


def test_a_chunked_body_still_works(gateway: Gateway, upstream: MockUpstream, unique: str) -> None:
    """Valid chunked framing is read as before."""
    body = chat_body(f"chunked {unique}")
    chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:])
    with connect(gateway) as sock:
        sock.sendall(HEAD + auth(KEY_A) + b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
        status, _, answer = read_answer(sock)
    assert status == 200, answer
    assert json.loads(answer)["choices"][0]["message"]["content"] == f"Mock answer to: chunked {unique}"


def test_slow_bodies_of_one_tenant_leave_room_for_another(upstream_server: MockUpstream) -> None:
    """Tenant A opens far more trickling bodies than the worker has connections; tenant B is still answered fast.

    A holds at most TENANT_MAX_PENDING_BODIES open; its other requests are refused at once (429, connection
    closed), so the worker's connection pool never fills up with them.
    """
    gw = Gateway(base_env(
        upstream_server, AUTH_DISABLED="false", GATEWAY_API_KEYS=f"a:{KEY_A},b:{KEY_B}", WORKER_CONNECTIONS="40",
        TENANT_MAX_PENDING_BODIES="5", REQUEST_BODY_TIMEOUT="30", REQUEST_IDLE_TIMEOUT="30",
    ))
    slow: list[socket.socket] = []
    try:
        for _ in range(80):
            sock = connect(gw)
            sock.sendall(HEAD + auth(KEY_A) + b"Content-Length: 1000\r\n\r\n{")
            slow.append(sock)
        started = time.monotonic()
        answer = requests.post(gw.url + "/v1/chat/completions", data=chat_body("tenant b"), timeout=10,
                               headers={"Authorization": f"Bearer {KEY_B}", "Content-Type": "application/json"})
        assert answer.status_code == 200, answer.text
        assert time.monotonic() - started < 1.0
        refused = 0
        for sock in slow:
            sock.settimeout(0.2)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue  # one of the five A may hold
            if data.startswith(b"HTTP/1.1 429"):
                assert b"too_many_pending_requests" in data and b"Connection: close" in data
                refused += 1
        assert refused >= 70
    finally:
        for sock in slow:
            sock.close()
        gw.stop()


# -- item 7: the smaller holes ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n", 414),
    (b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
    (b"GET /healthz HTTP/1.1\r\n" + b"X-Many: c\r\n" * 150 + b"\r\n", 431),
    (b"G@T / HTTP/1.1\r\nHost: gw\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\nHost: gw\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: gw\r\nBad Header: x\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: br, chunked\r\n\r\n", 501),
])
def test_gunicorns_own_errors_are_openai_json(gateway: Gateway, raw: bytes, status: int) -> None:
    """Requests gunicorn refuses before the app sees them are answered in the same JSON error shape."""
    with connect(gateway) as sock:
        sock.sendall(raw)
        got, headers, body = read_answer(sock)
    assert got == status, body
    json_error(got, headers, body)


def test_refusals_are_not_cache_bypasses(gateway: Gateway) -> None:
    """A 401 carries no X-Cache header and is not counted as a cache BYPASS."""
    refused = requests.post(gateway.url + "/v1/chat/completions", data=chat_body("no key"), timeout=10,
                            headers={"Authorization": "Bearer wrong", "Content-Type": "application/json"})
    openai_error(refused, 401)
    assert "X-Cache" not in refused.headers
    text = requests.get(gateway.metrics_url, timeout=10).text
    lines = [line for line in text.splitlines()
             if line.startswith("gateway_requests_total{") and 'status="401"' in line]
    assert lines and all('cache="NONE"' in line for line in lines), lines


def test_metrics_are_not_on_the_api_port(gateway: Gateway) -> None:
    """/metrics is a 404 on the API port and served on METRICS_PORT, which serves nothing else."""
    openai_error(requests.get(gateway.url + "/metrics", timeout=10), 404)
    page = requests.get(gateway.metrics_url, timeout=10)
    assert page.status_code == 200 and "gateway_requests_total" in page.text
    metrics_root = gateway.metrics_url.removesuffix("/metrics")
    assert requests.get(metrics_root + "/healthz", timeout=10).status_code == 200
    openai_error(requests.post(metrics_root + "/v1/chat/completions", data=chat_body("x"), timeout=10,
                               headers={"Authorization": f"Bearer {KEY_A}"}), 404)


def test_upstream_keys_are_scrubbed_from_error_bodies(upstream: MockUpstream) -> None:
    """An upstream 503 quoting the gateway's upstream key (whole, or its tail) reaches the client without it."""
    secret = "sk-upstream-scrub-" + uuid.uuid4().hex
    gw = Gateway(base_env(upstream, UPSTREAM_API_KEYS=secret, UPSTREAM_MAX_RETRIES="0"))
    try:
        upstream.faults({"status": 503, "message": f"overloaded for key {secret} (...{secret[-6:]})", "times": 1})
        answer = requests.post(gw.url + "/v1/chat/completions", data=chat_body("scrub"), timeout=10,
                               headers={"Content-Type": "application/json"})
        assert answer.status_code == 503
        assert secret not in answer.text and secret[-6:] not in answer.text and secret[-4:] not in answer.text
        assert "overloaded for key ***" in answer.json()["error"]["message"]
    finally:
        gw.stop()


def test_duplicate_model_key_is_refused(gateway: Gateway, upstream: MockUpstream) -> None:
    """`model` twice: read one way by the allow-list and maybe another by the provider, so refused (400)."""
    body = b'{"model":"allowed","messages":[{"role":"user","content":"dup"}],"model":"' + MODEL.encode() + b'"}'
    answer = requests.post(gateway.url + "/v1/chat/completions", data=body, timeout=10,
                           headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"})
    assert openai_error(answer, 400)["code"] == "duplicate_key"
    assert upstream.requests() == []


def test_n_is_bounded(gateway: Gateway, upstream: MockUpstream) -> None:
    """`n = 2**63` never goes upstream."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "n"}], "n": 2**63}
    answer = requests.post(gateway.url + "/v1/chat/completions", json=body, timeout=10,
                           headers={"Authorization": f"Bearer {KEY_A}"})
    openai_error(answer, 400)
    assert upstream.requests() == []


# -- item 2: large upstream answers ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bounded(upstream_server: MockUpstream) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, MAX_RESPONSE_BYTES="1048576", CACHE_MAX_ENTRY_BYTES="65536",
                          UPSTREAM_MAX_RETRIES="0"))
    yield gw
    gw.stop()


def post(gw: Gateway, text: str) -> requests.Response:
    return requests.post(gw.url + "/v1/chat/completions", data=chat_body(text), timeout=30,
                         headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("chunked", [False, True])
def test_an_answer_over_max_response_bytes_is_a_502_never_stored(bounded: Gateway, upstream: MockUpstream,
                                                                   unique: str, chunked: bool) -> None:
    """A 5 MiB answer with MAX_RESPONSE_BYTES = 1 MiB: 502, counted, and the same request is not a cache hit."""
    upstream.faults({"kind": "huge", "bytes": 5 * 1024 * 1024, "chunked": chunked, "times": 2})
    first = post(bounded, f"huge {unique}")
    assert first.status_code == 502, first.text[:300]  # (the old answer would be 5 MiB: not printed whole)
    assert openai_error(first, 502)["code"] == "upstream_response_too_large"
    second = post(bounded, f"huge {unique}")
    assert second.status_code == 502, second.text[:300]
    assert second.headers.get("X-Cache") != "HIT"
    assert len(upstream.requests()) == 2
    text = requests.get(bounded.metrics_url, timeout=10).text
    assert any(line.startswith("gateway_upstream_too_large_total{") and not line.endswith(" 0.0")
               for line in text.splitlines())


def test_an_answer_over_cache_max_entry_bytes_is_passed_on_not_stored(bounded: Gateway, upstream: MockUpstream,
                                                                      unique: str) -> None:
    """A 200 KB answer (under MAX_RESPONSE_BYTES, over CACHE_MAX_ENTRY_BYTES) is answered whole, twice upstream."""
    upstream.faults({"kind": "huge", "bytes": 200_000, "times": 2})
    first = post(bounded, f"big {unique}")
    assert first.status_code == 200
    assert len(first.json()["choices"][0]["message"]["content"]) > 190_000
    second = post(bounded, f"big {unique}")
    assert second.status_code == 200 and second.headers["X-Cache"] == "MISS"
    assert len(upstream.requests()) == 2
    small = post(bounded, f"small {unique}")
    assert small.headers["X-Cache"] == "MISS" and post(bounded, f"small {unique}").headers["X-Cache"] == "HIT"
    stats_line = [line for line in bounded.request_lines() if line.get("path") == "/v1/chat/completions"]
    assert any(line.get("prompt_tokens") == 1 and line.get("completion_tokens") == 1 for line in stats_line)


def test_a_flood_of_slow_heads_turns_over(upstream_server: MockUpstream) -> None:
    """More slowloris heads than the worker has connections: a crowded worker gives heads 2 s, not 10 s, so
    another client is answered within a few seconds instead of waiting out REQUEST_HEADER_TIMEOUT."""
    gw = Gateway(base_env(upstream_server, WORKER_CONNECTIONS="40"))
    slow: list[socket.socket] = []
    try:
        for _ in range(60):
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.connect(("127.0.0.1", gw.port))
            except BlockingIOError:
                pass
            slow.append(sock)
        time.sleep(0.3)
        for sock in slow:
            try:
                sock.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n")
            except OSError:
                pass
        started = time.monotonic()
        answer = requests.post(gw.url + "/v1/chat/completions", data=chat_body("past the flood"), timeout=15,
                               headers={"Content-Type": "application/json"})
        assert answer.status_code == 200
        assert time.monotonic() - started < 4.5
    finally:
        for sock in slow:
            sock.close()
        gw.stop()
