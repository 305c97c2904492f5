"""Shared fixtures: the mock upstream (one per session, reset per test) and a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.support import REDIS_URL, MockUpstream


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[MockUpstream]:
    server = MockUpstream()
    yield server
    server.stop()


@pytest.fixture
def upstream(upstream_server: MockUpstream) -> MockUpstream:
    """The session's mock upstream with no queued faults and an empty request log."""
    upstream_server.reset()
    return upstream_server


@pytest.fixture(scope="session")
def redis_conn() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.exit(f"the tests need Redis at {REDIS_URL} (make test starts one): {exc}", returncode=2)
    yield client
    client.close()


@pytest.fixture
def unique() -> str:
    """A fresh word for prompts and tenant names, so tests sharing one Redis never see each other's data."""
    return uuid.uuid4().hex[:12]
