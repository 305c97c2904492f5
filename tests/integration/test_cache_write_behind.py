"""The cache's writes that wait for the worker's next look-up (app/cache/write_behind.py), against a real Redis.

The stores act as in a gevent worker (their writes wait for a look-up's GET, or for the flush a few milliseconds
later) without patching this test process: `WriteBehind.waits` is switched on and gevent's sleep runs the flush.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import gevent
import numpy as np
import pytest
import redis

from app.cache import write_behind
from app.cache.exact import ExactStore
from app.cache.semantic import IndexBounds, SemanticStore
from app.cache.write_behind import WRITE_DELAY_SECONDS, WriteBehind
from tests.support import RedisServer

pytestmark = [pytest.mark.redis]

BOUNDS = IndexBounds(max_rows=100, max_bytes=1 << 20)
DIM = 8


@pytest.fixture()
def waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(WriteBehind, "waits", staticmethod(lambda: True))  # as in the gunicorn worker


@pytest.fixture()
def partition() -> Iterator[str]:
    name = f"test-wb-{uuid.uuid4().hex}"
    yield name
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    keys = list(client.scan_iter(f"gw:s2:{{{name}}}:*"))
    if keys:
        client.delete(*keys)


def vector(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def test_a_new_prompts_l1_and_l2_writes_ride_the_next_look_up(redis_conn: redis.Redis, waiting: None,
                                                               partition: str) -> None:
    """A stored answer's SET and L2 entry leave together with the next look-up's GET, in its round trip: before it
    neither is in Redis, after it both are, and this worker's index has the L2 row at once."""
    errors: list[Exception] = []
    writes = WriteBehind(redis_conn)
    exact, semantic = ExactStore(redis_conn, writes), SemanticStore(redis_conn, BOUNDS, writes)
    semantic.index(partition, DIM, 0.0)  # the worker holds this partition's index
    key = f"gw:test:wb:{uuid.uuid4().hex}"
    exact.put(key, b"answer", 60)
    semantic.put(partition, "e1", vector(1), None, "summarise ticket 12", b'{"answer": 1}', 60, errors.append)
    assert writes.pending() == 2 and redis_conn.exists(key) == 0
    assert not redis_conn.exists(f"gw:s2:{{{partition}}}:e:e1")
    assert [c.entry_id for c in semantic.index(partition, DIM, 0.0).search(vector(1), 0.5, 1.0)] == ["e1"]
    try:
        assert exact.get(f"gw:test:wb:{uuid.uuid4().hex}") is None  # a look-up's GET: the writes go with it
        assert writes.pending() == 0 and errors == []
        assert redis_conn.get(key).endswith(b"\nanswer")
        assert semantic.candidates(partition, ["e1"])[0][1] == b'{"answer": 1}'
        assert redis_conn.zscore(f"gw:s2:{{{partition}}}:log", "e1") is not None
    finally:
        redis_conn.delete(key)


def test_writes_no_look_up_takes_leave_alone_within_milliseconds(redis_conn: redis.Redis, waiting: None,
                                                                 partition: str) -> None:
    writes = WriteBehind(redis_conn)
    semantic = SemanticStore(redis_conn, BOUNDS, writes)
    semantic.put(partition, "e2", vector(2), vector(3), "text", b"{}", 60, lambda exc: None)
    gevent.sleep(WRITE_DELAY_SECONDS + 0.05)  # the flush
    assert writes.pending() == 0
    stored = redis_conn.hgetall(f"gw:s2:{{{partition}}}:e:e2")
    assert stored[b"q"] == b"text" and len(stored[b"t"]) == 4 * DIM


def test_an_entry_whose_script_redis_forgot_is_written_through_the_script_object(
        own_redis: RedisServer, waiting: None, partition: str) -> None:
    """After a Redis restart or SCRIPT FLUSH the waiting EVALSHA meets NOSCRIPT: the entry is written again through
    redis-py's script object (which loads the script), not lost and not reported as a failure. (A Redis of the
    test's own: the flush forgets every script.)"""
    client = redis.Redis.from_url(own_redis.url)
    errors: list[Exception] = []
    writes = WriteBehind(client)
    semantic = SemanticStore(client, BOUNDS, writes)
    client.script_flush()
    semantic.put(partition, "e3", vector(4), None, "text", b"{}", 60, errors.append)
    writes.flush()
    gevent.sleep(0.05)  # the greenlet that writes it again
    assert errors == []
    assert client.hget(f"gw:s2:{{{partition}}}:e:e3", "q") == b"text"


def test_a_round_trip_that_fails_is_reported_once_per_store(redis_conn: redis.Redis, waiting: None,
                                                            partition: str) -> None:
    """Redis out of reach: every waiting write is lost (a future miss), and each store is told once, not once per
    write (the same cause: one log line and one count, not a flood)."""
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    l1_errors: list[Exception] = []
    l2_errors: list[Exception] = []
    writes = WriteBehind(dead)
    exact, semantic = ExactStore(dead, writes, on_error=l1_errors.append), SemanticStore(dead, BOUNDS, writes)
    for n in range(3):
        exact.put(f"gw:test:wb:{n}", b"answer", 60)
        semantic.put(partition, f"e{n}", vector(n), None, "text", b"{}", 60, l2_errors.append)
    writes.flush()
    assert len(l1_errors) == 1 and len(l2_errors) == 1
    assert isinstance(l1_errors[0], redis.ConnectionError)


def test_a_write_past_the_bound_is_dropped_counted_and_logged_and_the_others_reach_redis(
        redis_conn: redis.Redis, waiting: None, caplog: pytest.LogCaptureFixture) -> None:
    told: list[int] = []
    writes = WriteBehind(redis_conn, max_pending=2, on_drop=lambda: told.append(1))
    store = ExactStore(redis_conn, writes)
    keys = [f"gw:test:bound:{uuid.uuid4().hex}" for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="app.concurrency"):
        for key in keys:  # no yield between them: nothing leaves before the third store
            store.put(key, b"answer", 60)
    assert writes.pending() == 2 and writes.dropped == 1 and told == [1]
    assert any("cache writes waiting for Redis full (2 writes or" in r.getMessage() for r in caplog.records)
    gevent.sleep(write_behind.WRITE_DELAY_SECONDS + 0.05)  # the flush that no look-up took
    try:
        assert writes.pending() == 0
        assert [redis_conn.exists(key) for key in keys] == [1, 1, 0]
        assert store.get(keys[0]) is not None and store.get(keys[2]) is None
    finally:
        redis_conn.delete(*keys)


def test_a_row_read_before_its_write_lands_is_a_miss_and_stays_indexed(redis_conn: redis.Redis, waiting: None,
                                                                      partition: str) -> None:
    """The worker indexes a new entry before Redis has it. A look-up that reads it in that window finds no answer
    (a miss, never an answer from elsewhere) and keeps the row, so the look-ups after the write find it (a
    forgotten row would stay out of this worker's index: a sync does not add an id it has seen)."""
    writes = WriteBehind(redis_conn)
    semantic = SemanticStore(redis_conn, BOUNDS, writes)
    semantic.index(partition, DIM, 0.0)
    semantic.put(partition, "e5", vector(5), None, "text", b'{"answer": 5}', 60, pytest.fail)
    assert semantic.candidates(partition, ["e5"]) == [(None, None)]  # read before the write: nothing to serve
    index = semantic.index(partition, DIM, 0.0)
    assert [c.entry_id for c in index.search(vector(5), 0.5, 1.0)] == ["e5"]
    writes.flush()
    assert semantic.candidates(partition, ["e5"])[0][1] == b'{"answer": 5}'


def test_writes_whose_round_trip_was_never_sent_wait_again(redis_conn: redis.Redis, waiting: None) -> None:
    """No connection for the look-up's GET: its error is the look-up's, and the writes it would have carried are
    not lost with it; they wait for the next round trip."""
    reporters: list[Exception] = []
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    writes = WriteBehind(dead)
    exact = ExactStore(dead, writes, on_error=reporters.append)
    exact.put("gw:test:wb:again", b"answer", 60)
    with pytest.raises(redis.ConnectionError):
        exact.get("gw:test:wb:other")
    assert writes.pending() == 1 and reporters == []
    writes.take()  # not to this test's dead Redis again


def test_the_bytes_waiting_are_bounded(redis_conn: redis.Redis, waiting: None) -> None:
    """Large answers count by their size: past the byte bound a store is dropped, whatever the count."""
    writes = WriteBehind(redis_conn, max_bytes=1000)
    store = ExactStore(redis_conn, writes)
    store.put("gw:test:wb:big1", b"x" * 600, 60)
    store.put("gw:test:wb:big2", b"x" * 600, 60)
    assert writes.pending() == 1 and writes.dropped == 1
    writes.take()
