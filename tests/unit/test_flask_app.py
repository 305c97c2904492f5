"""The gateway's Flask class runs every hook and view as Flask would, asking once per function whether it is async."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from app.proxy.flask_app import GatewayFlask


def test_a_plain_function_is_checked_once_and_run_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    app = GatewayFlask(__name__)
    asked: list[object] = []
    check = inspect.iscoroutinefunction
    monkeypatch.setattr("flask.app.iscoroutinefunction", lambda func: asked.append(func) or check(func))

    def view() -> str:
        return "ok"

    assert app.ensure_sync(view) is view and app.ensure_sync(view) is view
    assert asked == [view]


def test_an_async_function_still_goes_to_flask() -> None:
    """Flask wraps it (with its `async` extra) or refuses it (without): either way it is not run as it is."""
    app = GatewayFlask(__name__)

    async def view() -> str:
        await asyncio.sleep(0)
        return "ok"

    try:
        wrapped = app.ensure_sync(view)
    except RuntimeError as exc:
        assert "async" in str(exc)
    else:
        assert wrapped is not view and wrapped() == "ok"


def test_requests_run_through_the_hooks() -> None:
    app = GatewayFlask(__name__)
    ran: list[str] = []
    app.before_request(lambda: ran.append("before"))

    @app.get("/x")
    def x() -> str:
        ran.append("view")
        return "ok"

    with app.test_client() as client:
        assert client.get("/x").text == "ok" and client.get("/x").text == "ok"
    assert ran == ["before", "view", "before", "view"]
