"""Closing a request runs every step even when one fails: a rate-limit slot is never left held."""

from __future__ import annotations

import json
import logging

import pytest

from app.observability.json_lines import JsonLines
from app.observability.logging import JSON_FORMAT
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
    formatter = JsonLines(JSON_FORMAT)  # the log line as the app writes it
    lines = [json.loads(formatter.format(r)) for r in caplog.records if r.name == "gateway.access"]
    assert any(line["message"] == "request" and line["request_id"] == "rid-close" for line in lines)


def test_a_response_that_never_starts_still_closes_the_request() -> None:
    """gunicorn refusing the response (a header it will not write) raises out of the WSGI call, so no one would
    close the response: the middleware runs the request's close steps, once."""
    from app.proxy.context import CLOSER_KEY, _Closer, close_on_failure

    ran: list[str] = []
    rec = RequestRecord(request_id="rid-fail", method="POST", path="/v1/chat/completions", status=200)
    closer = _Closer(rec, [lambda: ran.append("release slot")])

    def failing_app(environ: dict, start_response: object) -> list[bytes]:
        environ[CLOSER_KEY] = closer
        raise ValueError("invalid header value")

    with pytest.raises(ValueError):
        close_on_failure(failing_app)({}, lambda *a: None)
    closer()  # the response's own close, should it come after all: not a second run
    assert ran == ["release slot"]


def test_a_normal_answer_is_left_to_the_response_close() -> None:
    from app.proxy.context import CLOSER_KEY, close_on_failure

    ran: list[str] = []

    def app(environ: dict, start_response: object) -> list[bytes]:
        environ[CLOSER_KEY] = lambda: ran.append("closed")
        return [b"ok"]

    assert close_on_failure(app)({}, lambda *a: None) == [b"ok"]
    assert ran == []
