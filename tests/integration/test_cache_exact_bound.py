"""The L1 SETs a gevent worker keeps waiting are bounded: past the bound a store is dropped, counted and logged.

Against a real Redis, with the store acting as in a gevent worker (its SETs wait for a look-up or for the flush
a few milliseconds later) without patching this test process.
"""

from __future__ import annotations

import logging
import uuid

import gevent
import pytest
import redis

from app.cache import exact
from app.cache.exact import ExactStore

pytestmark = [pytest.mark.redis]


def test_a_store_past_the_bound_is_dropped_counted_and_logged_and_the_others_reach_redis(
        redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(exact, "gevent_patched", lambda: True)  # SETs wait, as in the gunicorn worker
    told: list[int] = []
    store = ExactStore(redis_conn, max_pending=2, on_drop=lambda: told.append(1))
    keys = [f"gw:test:bound:{uuid.uuid4().hex}" for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="app.concurrency"):
        for key in keys:  # no yield between them: nothing leaves before the third store
            store.put(key, b"answer", 60)
    assert store.pending() == 2 and store.dropped == 1 and told == [1]
    assert any("L1 stores waiting for Redis full (2 SETs): 1 dropped" in r.getMessage() for r in caplog.records)
    gevent.sleep(exact.WRITE_DELAY_SECONDS + 0.05)  # the flush that no look-up took
    try:
        assert store.pending() == 0
        assert [redis_conn.exists(key) for key in keys] == [1, 1, 0]
        assert store.get(keys[0]) is not None and store.get(keys[2]) is None
    finally:
        redis_conn.delete(*keys)
