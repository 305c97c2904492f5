"""Stopping gunicorn: SIGTERM drains an in-flight stream; Ctrl-C stops it at once, without a traceback."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import requests

from tests.support import Gateway, MockUpstream, base_env, wait_until, worker_pids

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

CHUNK_DELAY = 0.5


@pytest.mark.slow
def test_sigterm_drains_an_in_flight_stream(upstream: MockUpstream, unique: str) -> None:
    """The stream running at SIGTERM completes with [DONE]; later connections fail; exit 0 well before the timeout."""
    gateway = Gateway(base_env(upstream, GRACEFUL_TIMEOUT="10"), workers=1)
    try:
        upstream.faults({"kind": "slow_chunks", "delay": CHUNK_DELAY})
        prompt = f"drain {unique}"  # "Mock answer to: drain <id>": role + 4 words + finish + [DONE] = 7 events
        events: list[str] = []
        first_event = threading.Event()
        failure: list[BaseException] = []

        def read_stream() -> None:
            try:
                with requests.post(
                    gateway.url + "/v1/chat/completions", stream=True, timeout=30,
                    json={"model": "mock-gpt", "stream": True, "messages": [{"role": "user", "content": prompt}]},
                ) as response:
                    assert response.status_code == 200
                    for line in response.iter_lines():
                        if line.startswith(b"data: "):
                            events.append(line[len(b"data: "):].decode())
                            first_event.set()
            except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
                failure.append(exc)
                first_event.set()

        reader = threading.Thread(target=read_stream, daemon=True)
        reader.start()
        assert first_event.wait(10), "no first chunk"
        gateway.signal(signal.SIGTERM)

        # The master closes its listening socket at once; the gevent worker notices SIGTERM on its next
        # one-second tick and closes its copy, so a new connection may still be served for about a second.
        refused_after = _seconds_until_refused(gateway.url, limit=2.5)
        assert refused_after is not None, "new connections were still accepted 2.5 s after SIGTERM"
        assert reader.is_alive(), "the stream was not still running when new connections were refused"

        reader.join(timeout=15)
        assert not reader.is_alive(), "the stream did not finish"
        assert not failure, failure
        assert events[-1] == "[DONE]"
        content = "".join(
            choice["delta"].get("content") or "" for event in events[:-1] for choice in json.loads(event)["choices"]
        )
        assert content == f"Mock answer to: {prompt}"

        stream_ended = time.monotonic()
        returncode = gateway.process.wait(timeout=10)
        assert returncode == 0, gateway.logs()
        # The worker checks for finished requests once a second; waiting for GRACEFUL_TIMEOUT would take 10 s.
        assert time.monotonic() - stream_ended < 3, "gunicorn waited for the graceful timeout, not for the stream"
        assert "graceful timeout" not in gateway.logs().lower()
    finally:
        gateway.stop()


def test_ctrl_c_stops_the_gateway_without_a_traceback(upstream: MockUpstream) -> None:
    """A terminal's Ctrl-C sends SIGINT to the whole process group (master and workers), and the master then sends
    its workers SIGQUIT: each worker quits once, quietly, and the master exits 0."""
    gateway = Gateway(base_env(upstream), workers=2)
    try:
        pids: list[int] = []

        def forked() -> bool:
            pids[:] = worker_pids(gateway.process.pid)
            return len(pids) == 2

        wait_until(forked, 30, "two workers")
        for pid in [gateway.process.pid, *pids]:
            os.kill(pid, signal.SIGINT)
        assert gateway.process.wait(timeout=15) == 0, gateway.logs()
        logs = gateway.logs()
        assert "Traceback" not in logs and "failed with SystemExit" not in logs, logs
        assert logs.count("Worker exiting") == 2, logs
    finally:
        gateway.stop()


def _seconds_until_refused(url: str, limit: float) -> float | None:
    """How long after now a new connection to `url` first fails, polling; None if it never does within `limit`."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        try:
            requests.get(url + "/healthz", timeout=0.5)
        except requests.ConnectionError:
            return time.monotonic() - started
        time.sleep(0.05)
    return None
