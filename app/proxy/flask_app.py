"""The gateway's Flask application class: Flask, with each hook's and view's sync check made once.

Flask calls `ensure_sync` on every before-request hook, view, after-request hook and teardown of every request,
and each call asks `inspect.iscoroutinefunction`, which unwraps the function every time: ~37,000 instructions per
request under callgrind (1.8 % of a cache-off chat request in a gevent worker). The gateway's functions do not
change once registered, so the answer is kept per function. Flask's documentation names `ensure_sync` as the method
to override to change how functions are run.
"""

from __future__ import annotations

from collections.abc import Callable
from types import FunctionType
from typing import Any

from flask import Flask


class GatewayFlask(Flask):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ensured: dict[Callable[..., Any], Callable[..., Any]] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        if type(func) is not FunctionType:  # a bound method or another callable may be made anew per call
            return super().ensure_sync(func)
        ensured = self._ensured.get(func)
        if ensured is None:
            ensured = self._ensured[func] = super().ensure_sync(func)
        return ensured
