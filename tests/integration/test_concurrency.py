"""One gevent worker serves hundreds of slow upstream requests at once."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support import Gateway, MockUpstream, base_env

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

CONCURRENT = 200


def test_one_worker_serves_200_concurrent_slow_requests(upstream: MockUpstream) -> None:
    """200 requests to an upstream taking 1 s each finish together on ONE worker, far below 200 s (or 10 s)."""
    upstream.configure(latency=1.0)
    gw = Gateway(base_env(upstream, UPSTREAM_API_KEYS=f"sk-conc-{uuid.uuid4().hex}", CACHE_ENABLED="false"),
                 workers=1)
    try:
        def one(i: int) -> int:
            body = {"model": "mock-gpt", "messages": [{"role": "user", "content": f"question {i}"}]}
            with requests.post(gw.url + "/v1/chat/completions", json=body, timeout=30) as response:
                assert response.json()["choices"][0]["message"]["content"] == f"Mock answer to: question {i}"
                return response.status_code

        with ThreadPoolExecutor(max_workers=CONCURRENT) as pool:
            started = time.monotonic()
            statuses = list(pool.map(one, range(CONCURRENT)))
            elapsed = time.monotonic() - started
        assert statuses == [200] * CONCURRENT
        assert elapsed < 6.0, f"{CONCURRENT} requests took {elapsed:.1f}s: the worker serialised them"
        assert len(upstream.requests()) == CONCURRENT
    finally:
        gw.stop()
