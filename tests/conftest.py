"""Shared fixtures: the mock upstream (one per session, reset per test) and a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from tests import support
from tests.support import REDIS_URL, MockUpstream, RedisServer

# Markers a test must carry by where it lives: `pytest -m "not e2e"` must leave out every test of tests/e2e, and
# a unit test carrying one of these would say it needs what tests/unit/conftest.py forbids.
_E2E = "e2e"
_NOT_IN_UNIT = frozenset({"redis", "gunicorn", "e2e"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a run where a test's markers contradict its directory."""
    wrong = []
    for item in items:
        names = {m.name for m in item.iter_markers()}
        folder = item.path.parent.name
        if folder == "e2e" and _E2E not in names:
            wrong.append(f"{item.nodeid}: tests/e2e needs @pytest.mark.e2e")
        if folder == "unit" and names & _NOT_IN_UNIT:
            wrong.append(f"{item.nodeid}: a unit test cannot need {sorted(names & _NOT_IN_UNIT)}")
    if wrong:
        raise pytest.UsageError("test markers:\n  " + "\n  ".join(wrong))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Let the helpers in tests/support.py check that the test declares the services they start."""
    support.running_markers = frozenset(m.name for m in item.iter_markers())
    if "redis_conn" in getattr(item, "fixturenames", ()):
        support.declared("redis", "the test Redis (the redis_conn fixture)")
    return (yield)


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


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test module's own: one it may scan whole, kill and start again."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.kill()
