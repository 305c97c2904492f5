"""tests/unit/conftest.py keeps unit tests pure: no process, no Redis (those tests belong in tests/integration)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import redis

from tests.support import REDIS_URL

PROCESS = "a unit test must not start a process"
REDIS = "a unit test must not connect to Redis"


def test_a_unit_test_cannot_start_a_process() -> None:
    """subprocess, fork and os.system all fail inside a unit test."""
    with pytest.raises(AssertionError, match=PROCESS):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
    with pytest.raises(AssertionError, match=PROCESS):
        os.fork()
    with pytest.raises(AssertionError, match=PROCESS):
        os.system("true")


def test_a_unit_test_cannot_reach_redis() -> None:
    """Neither redis-py nor a bare socket reaches the test Redis."""
    with pytest.raises(AssertionError, match=REDIS):
        redis.Redis.from_url(REDIS_URL, socket_timeout=1).ping()
    with socket.socket() as sock, pytest.raises(AssertionError, match=REDIS):
        sock.connect(("127.0.0.1", 6379))


def test_a_loopback_server_in_the_test_itself_is_allowed() -> None:
    """A server in the test's own process needs nothing from outside: unit tests may talk to one."""
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()) as client:
        peer, _ = server.accept()
        with peer:
            client.sendall(b"ping")
            assert peer.recv(4) == b"ping"
