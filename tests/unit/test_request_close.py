"""Closing a request runs every step even when one fails: a rate-limit slot is never left held."""

from __future__ import annotations

import logging

import pytest

from app.observability.record import RequestRecord
from app.proxy.context import _close


def test_a_failing_close_step_does_not_skip_the_others(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("cache store blew up")

    rec = RequestRecord(request_id="rid-close", method="POST", path="/v1/chat/completions", status=200)
    with caplog.at_level(logging.INFO):
        _close(rec, [broken, lambda: ran.append("release slot")])
    assert ran == ["release slot"]
    assert any(r.message == "request close step failed" and r.request_id == "rid-close" for r in caplog.records)
    assert any(r.name == "gateway.access" and r.request_id == "rid-close" for r in caplog.records)  # the log line
