"""Upstream key health shared between workers through a real Redis hash (each test on its own hash key)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from app.redis_client import build_redis
from app.upstream.health import KeyHealth
from tests.support import REDIS_URL, ClosedPort

pytestmark = pytest.mark.redis


@pytest.fixture
def health_class() -> Iterator[type[KeyHealth]]:
    """KeyHealth on a hash of this test's own, deleted afterwards."""
    name = f"gw:test:upstream-health:{uuid.uuid4().hex}"
    yield type("TestKeyHealth", (KeyHealth,), {"REDIS_KEY": name})
    redis.Redis.from_url(REDIS_URL).delete(name)


@pytest.fixture
def store() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL, socket_timeout=2)


@pytest.fixture
def dead_store() -> Iterator[redis.Redis]:
    """A client of a Redis that is not there: every command fails with ConnectionError, as in an outage."""
    closed = ClosedPort()
    yield build_redis(f"redis://127.0.0.1:{closed.port}/0", cluster=False, max_connections=2, socket_timeout=0.5)
    closed.close()


def workers(cls: type[KeyHealth], store: Any, count: int = 2) -> list[KeyHealth]:
    return [cls(store) for _ in range(count)]


def test_cooldown_is_shared_within_a_second(health_class: type[KeyHealth], store: redis.Redis) -> None:
    """A key one worker saw limited is avoided by another worker at its next refresh."""
    a, b = workers(health_class, store)
    assert b.cooling_until("k", 100.0) == 0.0
    a.cool_down("k", 30, now=100.0)
    assert b.cooling_until("k", 100.5) == 0.0  # b's view is at most a second old
    assert b.cooling_until("k", 101.1) == 130.0


def test_disable_is_shared(health_class: type[KeyHealth], store: redis.Redis) -> None:
    """A key rejected (401) in one worker is out everywhere."""
    a, b = workers(health_class, store)
    a.disable("k")
    assert b.state("k", 10.0) == "disabled"


@pytest.mark.parametrize("mark", ["cooling", "disabled"])
def test_restore_reaches_every_worker(health_class: type[KeyHealth], store: redis.Redis, mark: str) -> None:
    """The admin restore (in any worker) puts a cooling or disabled key back in every worker that marked it."""
    a, b, c = workers(health_class, store, 3)
    now = 1000.0
    if mark == "cooling":
        a.cool_down("k", 300, now=now)
    else:
        a.disable("k")
    assert b.state("k", now) == mark
    c.restore("k")
    later = now + 1.1
    assert a.state("k", later) == "ok"
    assert b.state("k", later) == "ok"


def test_local_mark_survives_while_redis_is_down(health_class: type[KeyHealth], store: redis.Redis,
                                                 dead_store: redis.Redis) -> None:
    """Redis down when the key was limited: this worker still avoids the key (its own view protects it)."""
    (a,) = workers(health_class, dead_store, 1)
    a.cool_down("k", 30, now=100.0)
    assert a.cooling_until("k", 102.0) == 130.0
    a._redis = store  # Redis back, but it never heard of the mark
    assert a.cooling_until("k", 104.0) == 130.0


def test_refresh_failure_keeps_the_view(health_class: type[KeyHealth], store: redis.Redis,
                                        dead_store: redis.Redis) -> None:
    """A failed refresh keeps the last known states."""
    a, b = workers(health_class, store)
    a.cool_down("k", 30, now=100.0)
    assert b.cooling_until("k", 101.5) == 130.0
    b._redis = dead_store
    assert b.cooling_until("k", 103.0) == 130.0


def test_mark_made_during_a_refresh_is_kept(health_class: type[KeyHealth], store: redis.Redis) -> None:
    """A 429 seen while this worker's refresh is waiting on Redis is not undone by the stale answer."""
    (a,) = workers(health_class, store, 1)

    class Racing(redis.Redis):
        def hgetall(self, name: str) -> Any:
            snapshot = super().hgetall(name)  # Redis answers before the mark...
            a.cool_down("k", 30, now=100.0)  # ...and another greenlet marks the key meanwhile
            return snapshot

    a._redis = Racing.from_url(REDIS_URL)
    assert a.cooling_until("k", 100.0) == 130.0


@pytest.mark.parametrize("garbage", [b"soon", b"inf", b"nan", b"\xff\xfe"])
def test_an_unreadable_state_in_redis_is_ignored(health_class: type[KeyHealth], store: redis.Redis,
                                                 garbage: bytes) -> None:
    """Whatever another tool wrote into the hash, the other keys' states still arrive and nothing raises."""
    a, b = workers(health_class, store)
    store.hset(health_class.REDIS_KEY, "junk", garbage)
    a.cool_down("k", 30, now=100.0)
    assert b.cooling_until("k", 101.1) == 130.0
    assert b.state("junk", 101.1) == "ok"
