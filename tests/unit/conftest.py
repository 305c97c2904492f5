"""Unit tests are pure: a unit test (or a fixture it uses) that starts a process or connects to Redis fails.

Tests that need Redis, gunicorn or the mock upstream's process belong in tests/integration (or tests/e2e).
A loopback server in a thread of the test's own process is allowed: it needs nothing from outside.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest
import redis.connection

from tests.support import REDIS_URL

REDIS_PORTS = frozenset({6379, urlsplit(REDIS_URL).port or 6379})
_SPAWNERS = ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system")


class NotAUnitTest(AssertionError):
    """What a unit test gets when it reaches for a process or Redis."""


def _refuse(what: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise NotAUnitTest(f"a unit test must not {what}: move it to tests/integration")

    return refuse


def _connect_unless_redis(connect: Any) -> Any:
    def guarded(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[1] in REDIS_PORTS:
            raise NotAUnitTest("a unit test must not connect to Redis: move it to tests/integration")
        return connect(sock, address)

    return guarded


@contextmanager
def pure() -> Iterator[None]:
    """No process can start and no Redis can be reached inside this block."""
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(subprocess.Popen, "__init__", _refuse("start a process")))
        for name in _SPAWNERS:
            if hasattr(os, name):
                stack.enter_context(mock.patch.object(os, name, _refuse("start a process")))
        stack.enter_context(
            mock.patch.object(redis.connection.AbstractConnection, "connect", _refuse("connect to Redis")))
        for method in ("connect", "connect_ex"):
            original = getattr(socket.socket, method)
            stack.enter_context(mock.patch.object(socket.socket, method, _connect_unless_redis(original)))
        yield


# Setup, call and teardown each run guarded, so a module- or session-scoped fixture that starts a process for
# unit tests fails too. These hooks apply to the items under tests/unit only (conftest scoping).
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with pure():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with pure():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    with pure():
        return (yield)
