"""CORS: preflights answered without a key, allowed origins told so, others refused, and a real cross-origin
`fetch` from headless Chromium (Debian's `chromium`, installed by .ci/run) against the running gateway."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from tests.support import Gateway, MockUpstream, base_env, missing_tool, openai_error

pytestmark = [pytest.mark.e2e, pytest.mark.gunicorn, pytest.mark.redis]

CLIENT_KEY = f"sk-cors-{uuid.uuid4().hex}"
OTHER = "http://evil.example"
SDK_HEADERS = "authorization, content-type, x-stainless-lang, x-stainless-retry-count, openai-organization"


PAGE = """<!doctype html><html><body><script>
(async () => {
  let result;
  try {
    const response = await fetch("%(gateway)s/v1/chat/completions", {method: "POST",
      headers: {"Authorization": "Bearer %(key)s", "Content-Type": "application/json"},
      body: JSON.stringify({model: "mock-gpt", messages: [{role: "user", content: "from a browser"}]})});
    const body = await response.json();
    result = {ok: true, status: response.status, content: body.choices[0].message.content,
              requestId: response.headers.get("x-request-id"), cache: response.headers.get("x-cache")};
  } catch (error) {
    result = {ok: false, error: String(error)};
  }
  await fetch("/result", {method: "POST", body: JSON.stringify(result)});
})();
</script></body></html>"""


class PageServer:
    """A page on its own origin whose script calls the gateway and posts what happened back here."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.gateway_url = ""
        results = self.results
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                page = (PAGE % {"gateway": server.gateway_url, "key": CLIENT_KEY}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def do_POST(self) -> None:  # noqa: N802
                results.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = self.origin + "/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> PageServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="module")
def allowed_page() -> Iterator[PageServer]:
    """The page on the allowed origin, bound before the gateway starts so its port is known and held."""
    with PageServer() as page:
        yield page


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream, allowed_page: PageServer) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, UPSTREAM_API_KEYS=f"sk-cors-up-{uuid.uuid4().hex}",
                          AUTH_DISABLED="false", GATEWAY_API_KEYS=CLIENT_KEY, CORS_ALLOW_ORIGINS=allowed_page.origin,
                          CACHE_ENABLED="false"))
    allowed_page.gateway_url = gw.url
    yield gw
    gw.stop()


@pytest.fixture
def allowed(allowed_page: PageServer) -> str:
    return allowed_page.origin


def preflight(gw: Gateway, origin: str) -> requests.Response:
    return requests.options(gw.url + "/v1/chat/completions", timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": SDK_HEADERS})


def test_preflight_from_an_allowed_origin_needs_no_key(gateway: Gateway, allowed: str) -> None:
    """OPTIONS from an allowed origin: 204 allowing POST and the SDK's headers, without a key."""
    response = preflight(gateway, allowed)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == allowed
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == SDK_HEADERS


def test_preflight_from_another_origin_is_refused(gateway: Gateway) -> None:
    """OPTIONS from an origin not listed: a 403 OpenAI error without any Access-Control-Allow-* header."""
    response = preflight(gateway, OTHER)
    openai_error(response, 403)
    assert not [h for h in response.headers if h.lower().startswith("access-control-allow")]


def test_answers_expose_the_gateway_headers(gateway: Gateway, allowed: str) -> None:
    """A request from an allowed origin (200 or 401) names the origin and exposes request id, cache, limits."""
    for headers, status in (({"Authorization": f"Bearer {CLIENT_KEY}"}, 200), ({}, 401)):
        response = requests.post(gateway.url + "/v1/chat/completions", timeout=10, headers={"Origin": allowed,
                                 **headers}, json={"model": "mock-gpt", "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == status
        assert response.headers["Access-Control-Allow-Origin"] == allowed
        exposed = response.headers["Access-Control-Expose-Headers"]
        for name in ("x-request-id", "x-cache", "x-ratelimit-remaining-requests", "retry-after"):
            assert name in exposed
    other = requests.post(gateway.url + "/v1/chat/completions", timeout=10, headers={
        "Origin": OTHER, "Authorization": f"Bearer {CLIENT_KEY}"},
        json={"model": "mock-gpt", "messages": [{"role": "user", "content": "x"}]})
    assert "Access-Control-Allow-Origin" not in other.headers


def browse(url: str, page: PageServer, timeout: float = 30) -> dict[str, Any]:
    """Open the page in headless Chromium (fresh profile) until its script has reported."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        missing_tool("no chromium binary (apt-get install -y chromium; .ci/run installs it)")
    profile = tempfile.mkdtemp(prefix="cors-chromium-")
    process = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not page.results and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        assert page.results, "the page never reported (chromium failed to run the script)"
        return page.results[0]
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(profile, ignore_errors=True)


def test_browser_fetch_from_allowed_and_other_origin(gateway: Gateway, allowed_page: PageServer,
                                                     upstream: MockUpstream) -> None:
    """Headless Chromium: the allowed origin's fetch gets the answer and the exposed headers; the same page on
    another origin (another port) is refused by the browser, and nothing reaches the upstream for it."""
    result = browse(allowed_page.url, allowed_page)
    assert result["ok"] is True, result
    assert result["status"] == 200 and result["content"] == "Mock answer to: from a browser"
    assert result["requestId"] and result["cache"] == "BYPASS"
    upstream.reset()
    with PageServer() as other:
        other.gateway_url = gateway.url
        result = browse(other.url, other)
    assert result["ok"] is False and "Failed to fetch" in result["error"]
    assert upstream.requests() == []
