"""The gateway's JSON formatter writes every line exactly as python-json-logger's own does, for every kind of record."""

from __future__ import annotations

import copy
import logging
import sys
from typing import Any

import pytest
from pythonjsonlogger.json import JsonFormatter

from app.observability.json_lines import JsonLines
from app.observability.logging import JSON_FORMAT, logging_config

RENAMES = logging_config()["formatters"]["json"]["rename_fields"]
ACCESS = {"message": "request", "request_id": "rid-1", "status": 200, "latency_ms": 51.2, "upstream_ms": 50.1,
          "cache": None, "fallbacks": [{"model": "b", "status": 503}], "stream": False, "cost_usd": 1.2e-05}


def record(msg: Any, args: tuple = (), extra: dict[str, Any] | None = None, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.getLogger("gateway.access").makeRecord("gateway.access", logging.INFO, __file__, 1, msg, args,
                                                          exc_info, extra=extra)


RECORDS = {
    "an access line (a dict message)": lambda: record(ACCESS),
    "a message with arguments": lambda: record("fallback to %s passed over: %s", ("m", "limited")),
    "a message with extra fields": lambda: record("request close step failed", extra={"request_id": "r"}),
    "a dict message and an extra": lambda: record(ACCESS, extra={"tenant": "t"}),
    "a dict message with a renamed key": lambda: record({"message": "m", "name": "mine", "levelname": "x"}),
    "an extra whose name starts with _": lambda: record("m", extra={"_private": 1}),
    "an exception": lambda: record("failed", exc=True),
}
CONFIGS = {
    "the gateway's": {"rename_fields": RENAMES},
    "no renames": {},
    "static fields": {"rename_fields": RENAMES, "static_fields": {"service": "gw"}},
    "a timestamp": {"rename_fields": RENAMES, "timestamp": True},
    "defaults": {"rename_fields": RENAMES, "defaults": {"env": "test"}},
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("make", RECORDS.values(), ids=RECORDS.keys())
def test_the_same_line_as_python_json_logger(make: Any, config: dict[str, Any]) -> None:
    ours, theirs = JsonLines(JSON_FORMAT, **config), JsonFormatter(JSON_FORMAT, **config)
    one = make()  # the same record (its time) for both, each formatting a copy of it
    assert ours.format(copy.copy(one)) == theirs.format(copy.copy(one))


def test_the_gateway_logs_with_it() -> None:
    assert logging_config()["formatters"]["json"]["()"] == "app.observability.json_lines.JsonLines"
