"""deploy/nginx.conf in front of a real gunicorn: plain and streamed answers, X-Request-ID, the JSON 413.

The chain is the production one: openai SDK -> nginx -> gunicorn (gevent) -> gateway -> mock upstream.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from tests.support import Gateway, MockUpstream, base_env, free_port, missing_tool, wait_until
from tests.unit.test_nginx_conf import nginx_binary, render_nginx_conf

pytestmark = [pytest.mark.e2e, pytest.mark.gunicorn, pytest.mark.redis, pytest.mark.nginx]

MODEL = "mock-gpt"


class Nginx:
    """nginx in the foreground on a rendered copy of deploy/nginx.conf; everything it writes stays in `root`."""

    def __init__(self, binary: str, root: Path, upstream_port: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root
        conf = render_nginx_conf(root, self.port, upstream_port)
        self._stderr = open(root / "log" / "stderr.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            # -e: the error log used before the config is read, so nothing touches /var/log/nginx.
            [binary, "-c", str(conf), "-p", str(root), "-e", str(root / "log" / "startup.log"), "-g", "daemon off;"],
            stdout=self._stderr, stderr=subprocess.STDOUT,
        )
        try:
            wait_until(self._ready, 15, "nginx")
        except TimeoutError:
            self.stop()
            raise TimeoutError(f"nginx did not start:\n{self.logs()}") from None

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise TimeoutError(f"nginx exited with {self.process.returncode}")
        return requests.get(self.url + "/healthz", timeout=1).ok

    def logs(self) -> str:
        return "\n".join(
            path.read_text(errors="replace") for path in sorted((self.root / "log").glob("*.log")) if path.is_file()
        )

    def access_lines(self) -> list[dict]:
        path = self.root / "log" / "access.log"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: nginx's fast shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stderr.close()


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, TRUSTED_PROXIES="127.0.0.1", ADMIN_API_KEY="admin"))
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def nginx(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    binary = nginx_binary()
    if binary is None:
        missing_tool("no nginx binary (apt-get install -y nginx; .ci/run installs it)")
    server = Nginx(binary, tmp_path_factory.mktemp("nginx"), gateway.port)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(nginx: Nginx) -> Iterator[openai.OpenAI]:
    sdk = openai.OpenAI(base_url=nginx.url + "/v1", api_key="unused-auth-is-off", max_retries=0, timeout=30)
    try:
        yield sdk
    finally:
        sdk.close()


def test_plain_request_through_nginx(client: openai.OpenAI, upstream: MockUpstream, unique: str) -> None:
    """A non-streamed chat completion comes back through nginx with the upstream's content."""
    completion = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"plain {unique}"}])
    assert completion.choices[0].message.content == f"Mock answer to: plain {unique}"
    assert len(upstream.requests()) == 1


def test_stream_is_not_buffered_by_nginx(client: openai.OpenAI, upstream: MockUpstream, unique: str) -> None:
    """Streamed chunks arrive as the upstream sends them (0.4 s apart), not all at once at the end."""
    upstream.faults({"kind": "slow_chunks", "delay": 0.4})
    prompt = f"stream one two {unique}"
    arrivals: list[tuple[float, str]] = []
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True)
    with stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append((time.monotonic(), chunk.choices[0].delta.content))
    assert "".join(text for _, text in arrivals) == f"Mock answer to: {prompt}"
    assert len(arrivals) >= 6
    assert arrivals[-1][0] - arrivals[0][0] >= 1.0, "nginx buffered the stream"


def test_request_id_passes_through_both_ways(nginx: Nginx, gateway: Gateway, upstream: MockUpstream,
                                             unique: str) -> None:
    """An X-Request-ID sent through nginx comes back unchanged and is the id in the gateway's log line."""
    request_id = f"nginx-{unique}"
    response = requests.post(
        nginx.url + "/v1/chat/completions", timeout=30, headers={"X-Request-ID": request_id},
        json={"model": MODEL, "messages": [{"role": "user", "content": f"id {unique}"}]},
    )
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == request_id
    wait_until(lambda: any(line["request_id"] == request_id for line in gateway.request_lines()), 5, "log line")
    (line,) = [line for line in gateway.request_lines() if line["request_id"] == request_id]
    assert line["status"] == 200
    wait_until(lambda: any(line["request_id"] == request_id for line in nginx.access_lines()), 5, "access log")


def test_body_above_the_buffer_size_reaches_the_gateway(nginx: Nginx, upstream: MockUpstream, unique: str) -> None:
    """A 3 MB body (over client_body_buffer_size, under the limit) streams through nginx to the upstream."""
    padding = "x" * 3 * 1024 * 1024  # in a field the gateway passes through untouched, so the answer stays short
    response = requests.post(
        nginx.url + "/v1/chat/completions", timeout=30, headers={"Cache-Control": "no-store"},
        json={"model": MODEL, "user": padding, "messages": [{"role": "user", "content": f"big {unique}"}]},
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == f"Mock answer to: big {unique}"
    (seen,) = upstream.requests()
    assert seen["body"]["user"] == padding


def test_body_over_the_limit_gets_json_413(nginx: Nginx, upstream: MockUpstream) -> None:
    """A body over client_max_body_size is refused by nginx with the gateway's JSON error shape."""
    body = b'{"model":"mock-gpt","messages":[{"role":"user","content":"' + b"x" * 10_485_760 + b'"}]}'
    response = requests.post(nginx.url + "/v1/chat/completions", data=body, timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert upstream.requests() == []


def test_metrics_and_admin_stay_off_the_public_server(nginx: Nginx, upstream: MockUpstream) -> None:
    """/metrics and /admin/* through the public nginx server: a JSON 404, never the gateway's page."""
    for path in ("/metrics", "/admin/cache/stats", "/admin/keys"):
        response = requests.get(nginx.url + path, timeout=10, headers={"Authorization": "Bearer admin"})
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
        assert "gateway_requests_total" not in response.text
