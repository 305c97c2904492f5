"""The short hostile-input part of the fault suite (tools/chaos.py), run in CI: a bounded fuzz corpus against a
real gunicorn. No 500, every error an OpenAI-style JSON, and the gateway still answers afterwards.

`make chaos` runs the full corpus (FUZZ_CASES) and the fault experiments; this is its quick, deterministic part.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from tests.support import Gateway, MockUpstream, base_env
from tools.chaos import CHAT_PATH, chat, fuzz_corpus, request_bytes, run_fuzz, send_raw

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

KEY = "sk-hostile-" + uuid.uuid4().hex
CASES = 1500


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    # Short read timeouts: the corpus holds bodies that never arrive, and each costs the idle timeout.
    gw = Gateway(base_env(upstream_server, AUTH_DISABLED="false", GATEWAY_API_KEYS=f"fuzz:{KEY}",
                          REQUEST_IDLE_TIMEOUT="1", REQUEST_HEADER_TIMEOUT="2", REQUEST_BODY_TIMEOUT="3",
                          LOG_LEVEL="WARNING"), workers=2)
    yield gw
    gw.stop()


def test_fuzz_corpus_gets_no_500_and_only_json_errors(gateway: Gateway) -> None:
    """1,500 hostile requests (bodies, chunked framing, headers, request lines): no 500, every error JSON."""
    started = time.monotonic()
    result = run_fuzz(gateway.port, fuzz_corpus(CASES, KEY), concurrency=16, timeout=10)
    assert result.cases == CASES
    assert result.statuses[500] == 0, result.statuses
    assert not result.not_json, result.not_json[:10]
    assert sum(result.no_answer.values()) <= CASES // 100, result.no_answer  # closed without a word: rare
    assert time.monotonic() - started < 45
    logs = gateway.logs()
    assert "Traceback" not in logs and "unhandled error" not in logs


def test_the_gateway_answers_after_the_corpus(gateway: Gateway) -> None:
    """Workers survived (same pids answer) and a normal request is served."""
    answer = send_raw(gateway.port, request_bytes("POST", CHAT_PATH, chat("still here"), {
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}))
    assert answer.status == 200
    assert requests.get(gateway.url + "/healthz", timeout=5).status_code == 200
    assert "Worker exiting" not in gateway.logs() and "WORKER TIMEOUT" not in gateway.logs()


def test_the_corpus_is_large_and_varied() -> None:
    """The full corpus has at least 5,000 cases, chunked and header abuse among them."""
    kinds = {name.split(":")[0] + (":" + name.split(":")[2] if name.startswith("body:") else "")
             for name, _ in fuzz_corpus(5200, KEY)}
    assert {"chunk", "hdr", "line", "body:_chunked", "body:_chunked_odd", "body:_plain"} <= kinds
