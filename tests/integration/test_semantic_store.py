"""The L2 store against a real Redis: bounded indexes per worker, expiry, and what a sync brings back."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import redis

from app.cache.local import LocalCache
from app.cache.semantic import SYNC_SECONDS, IndexBounds, SemanticStore
from app.cache.service import CacheHit, CacheOptions, CachePlan, CacheService
from app.embeddings.local import LocalEmbedder
from app.embeddings.static import StaticEmbedder

pytestmark = pytest.mark.redis

DIM = 16
ANSWER = {"choices": [{"message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}


def vectors(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def fill(store: SemanticStore, partition: str, n: int, seed: int, ttl: int = 60) -> np.ndarray:
    rows = vectors(n, seed)
    store.index(partition, DIM, time.time())
    for i, row in enumerate(rows):
        store.put(partition, f"{partition}-{i}", row, None, f"text {i} of {partition}", b"{}", ttl,
                  on_error=pytest.fail)
    return rows


def test_one_busy_partition_stays_within_the_bound_and_others_keep_their_rows(redis_conn: redis.Redis,
                                                                               unique: str) -> None:
    """Filling one partition past the row bound evicts its own oldest rows; a quiet partition loses nothing."""
    store = SemanticStore(redis_conn, IndexBounds(max_rows=120, max_bytes=10_000_000))
    quiet, busy = f"quiet-{unique}", f"busy-{unique}"
    quiet_rows = fill(store, quiet, 20, seed=1)
    busy_rows = fill(store, busy, 300, seed=2)
    assert store.rows <= 120 and store.evicted >= 200
    now = time.time()
    assert len(store.index(quiet, DIM, now)) == 20
    found = store.index(quiet, DIM, now).search(quiet_rows[3], 0.99, now)
    assert found and found[0].entry_id == f"{quiet}-3"
    newest = store.index(busy, DIM, now).search(busy_rows[-1], 0.99, now)
    assert newest and newest[0].entry_id == f"{busy}-299"
    assert not store.index(busy, DIM, now).search(busy_rows[0], 0.99, now)  # the oldest went first


def test_a_row_stored_again_after_it_was_dropped_is_evicted_as_new(redis_conn: redis.Redis, unique: str) -> None:
    """The oldest row goes first: a prompt stored again after its row was dropped (its entry expired or left
    Redis) is the newest row, not the oldest, when the bound is reached."""
    store = SemanticStore(redis_conn, IndexBounds(max_rows=40, max_bytes=10_000_000))
    partitions = [f"p{n}-{unique}" for n in range(5)]
    rows = {partition: fill(store, partition, 8, seed=n) for n, partition in enumerate(partitions)}
    first, again = partitions[0], f"{partitions[0]}-0"
    redis_conn.delete(f"gw:s2:{{{first}}}:e:{again}")
    assert store.candidates(first, [again]) == [(None, None)]  # gone from Redis: the worker drops its row
    store.put(first, again, rows[first][0], None, "text 0 again", b"{}", 60, on_error=pytest.fail)
    assert store.rows == 40
    # One row past the bound, in another partition: the oldest row of the worker goes.
    store.put(partitions[1], "one-more", vectors(1, seed=99)[0], None, "one more", b"{}", 60, on_error=pytest.fail)
    now = time.time()
    index = store.index(first, DIM, now)
    assert store.rows == 40 and index.is_live(again) and not index.is_live(f"{first}-1")


def test_byte_bound_holds_with_long_texts(redis_conn: redis.Redis, unique: str) -> None:
    store = SemanticStore(redis_conn, IndexBounds(max_rows=10_000, max_bytes=60_000))
    partition = f"bytes-{unique}"
    store.index(partition, DIM, time.time())
    for i, row in enumerate(vectors(100, seed=3)):
        store.put(partition, f"e{i}", row, None, "x" * 2000, b"{}", 60, on_error=pytest.fail)
        assert store.bytes <= 60_000
    assert 0 < store.rows < 100


def test_sync_brings_entries_written_elsewhere_and_skips_expired(redis_conn: redis.Redis, unique: str) -> None:
    """A second worker's index picks up the first's entries on its next sync; an expired row is never a candidate."""
    writer = SemanticStore(redis_conn, IndexBounds(1000, 10_000_000))
    reader = SemanticStore(redis_conn, IndexBounds(1000, 10_000_000))
    partition = f"sync-{unique}"
    assert len(reader.index(partition, DIM, time.time())) == 0
    rows = fill(writer, partition, 5, seed=5, ttl=1)
    later = time.time() + 0.6
    index = reader.index(partition, DIM, later)
    assert len(index) == 5
    assert index.search(rows[2], 0.99, later)[0].text == f"text 2 of {partition}"
    assert index.search(rows[2], 0.99, time.time() + 5) == []


def test_a_full_write_queue_drops_counts_and_logs_without_slowing_requests(redis_conn: redis.Redis, unique: str,
                                                                           caplog) -> None:
    """Stores past the queue's cap return at once; each dropped L2 write is counted in the metric and logged."""
    import logging

    import gevent
    from prometheus_client import REGISTRY

    def dropped() -> float:
        return REGISTRY.get_sample_value("gateway_background_dropped_total", {"queue": "semantic_store"}) or 0.0

    options = CacheOptions(ttl_seconds=60, semantic_enabled=True, semantic_threshold=None,
                           semantic_max_temperature=0.7, store_queue_size=3)
    service = CacheService(redis_conn, options, LocalCache(0, 0), LocalEmbedder(offload=False), StaticEmbedder(),
                           background=True)
    before = dropped()
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="app.concurrency"):
        for i in range(10):  # the consumer greenlet cannot run: nothing here yields to the hub
            plan, _ = ask(service, unique, f"Ticket {i}?")
    assert time.perf_counter() - started < 2.0
    assert service.writes.dropped == 7 and dropped() == before + 7
    assert any("background queue semantic_store full" in r.getMessage() for r in caplog.records)
    gevent.sleep(0.2)  # the three queued writes now run
    assert service.writes.pending() == 0
    assert redis_conn.zcard(SemanticStore._log_key(plan.partition)) == 3


def test_a_partition_where_l2_never_pays_is_only_sampled(redis_conn: redis.Redis, unique: str) -> None:
    """After a long run of look-ups without a hit, a partition is looked up (and written) one request in eight."""
    from app.cache.service import COLD_AFTER, COLD_SAMPLE

    service = l2_service(redis_conn)

    def reason(text: str) -> str | None:
        plan = chat_plan(service, unique, text)
        service.lookup(plan)
        return plan.reason

    reasons = [reason(f"Summarise ticket {i} in one line.") for i in range(COLD_AFTER + 4 * COLD_SAMPLE)]
    assert "cold_partition" not in reasons[:COLD_AFTER]
    tail = reasons[COLD_AFTER:]
    assert tail.count("cold_partition") == len(tail) - len(tail) // COLD_SAMPLE


def l2_service(redis_conn: redis.Redis, embedder: LocalEmbedder | None = None) -> CacheService:
    """A worker's cache service with L2 on, the local model run in-process."""
    options = CacheOptions(ttl_seconds=60, semantic_enabled=True, semantic_threshold=None,
                           semantic_max_temperature=0.7)
    return CacheService(redis_conn, options, LocalCache(0, 0), embedder or LocalEmbedder(offload=False),
                        StaticEmbedder())


def chat_plan(service: CacheService, tenant: str, text: str) -> CachePlan:
    body = {"model": "m", "temperature": 0, "messages": [{"role": "system", "content": tenant},
                                                          {"role": "user", "content": text}]}
    return service.plan(SimpleNamespace(route="chat", model="m", body=body), tenant, None, None)


def ask(service: CacheService, tenant: str, text: str) -> tuple[CachePlan, CacheHit | None]:
    """Look the prompt up; on a miss, store an answer for it (as the route does after the upstream answered)."""
    plan = chat_plan(service, tenant, text)
    hit = service.lookup(plan)
    if hit is None:
        service.store(plan, ANSWER, None)
    return plan, hit


def entry_key(plan: CachePlan) -> str:
    assert plan.key is not None and plan.partition is not None
    return SemanticStore._entry_key(plan.partition, plan.key.rsplit(":", 1)[-1][:32])


def has_vector(redis_conn: redis.Redis, plan: CachePlan) -> bool:
    return redis_conn.hget(entry_key(plan), "t") is not None


def test_after_a_hit_new_entries_of_the_partition_get_their_transformer_vector(redis_conn: redis.Redis,
                                                                               unique: str) -> None:
    """Where paraphrases do come, a new entry is embedded after its answer, so the next paraphrase embeds only itself;
    elsewhere entries keep only their static vector (no model run on a new prompt)."""
    service = l2_service(redis_conn)
    first, _ = ask(service, unique, "How do I reset my password?")
    assert not has_vector(redis_conn, first)
    _, hit = ask(service, unique, "How can I reset my password?")
    assert hit is not None and hit.layer == "L2"
    later, _ = ask(service, unique, "How do I delete my account?")
    assert has_vector(redis_conn, later)


def test_a_hit_in_one_worker_warms_the_partition_for_every_worker(redis_conn: redis.Redis, unique: str) -> None:
    """Workers share the warm mark: after worker A serves a paraphrase, worker B's new entries there get their
    transformer vector too (at B's next sync), so a paraphrase B's entry attracts needs one model run, not two."""
    embedder = LocalEmbedder(offload=False)
    worker_a, worker_b = l2_service(redis_conn, embedder), l2_service(redis_conn, embedder)
    before, _ = ask(worker_b, unique, "How do I change my email address?")
    assert not has_vector(redis_conn, before)  # nobody has hit here yet: B stores the static vector only
    ask(worker_a, unique, "How do I reset my password?")
    _, hit = ask(worker_a, unique, "How can I reset my password?")
    assert hit is not None and hit.layer == "L2"
    time.sleep(SYNC_SECONDS + 0.1)
    after, _ = ask(worker_b, unique, "Translate into French: the weather is lovely by the sea today.")
    assert after.vector is None  # no candidate near it: the look-up ran no model
    assert has_vector(redis_conn, after)


def test_an_entry_gone_from_redis_is_never_served_and_leaves_the_index(redis_conn: redis.Redis, unique: str) -> None:
    """The worker's index still lists an entry deleted (or expired) in Redis since its last sync: the paraphrase
    that would have hit it is a miss, without a model run, and the row goes."""
    service = l2_service(redis_conn)
    stored, _ = ask(service, unique, "How do I reset my password?")
    _, hit = ask(service, unique, "How can I reset my password?")
    assert hit is not None and hit.layer == "L2"
    assert redis_conn.delete(entry_key(stored)) == 1
    rows, runs = service.semantic.rows, service.embedder.calls  # type: ignore[union-attr]
    assert service.lookup(chat_plan(service, unique, "How could I reset my password?")) is None
    assert service.semantic.rows == rows - 1
    assert service.embedder.calls == runs  # type: ignore[union-attr] # nothing left to compare: no model run


def test_an_l1_hit_leaves_no_trace_of_the_l2_stage_run_while_its_get_travelled(redis_conn: redis.Redis,
                                                                               unique: str) -> None:
    """L2's first stage runs while L1's GET is on the wire; when L1 answers, nothing of it is counted: no static
    embedding, no skip, no L2 look-up, no reason in the log line, and the partition's streak does not move."""
    from prometheus_client import REGISTRY

    def counted() -> list[float]:
        names = [("gateway_embeddings_total", {"stage": "static"}),
                 ("gateway_cache_lookups_total", {"layer": "L2", "result": "miss"}),
                 *(("gateway_semantic_skipped_total", {"reason": r})
                   for r in ("no_candidate", "empty_partition", "cold_partition"))]
        return [REGISTRY.get_sample_value(name, labels) or 0.0 for name, labels in names]

    service = l2_service(redis_conn)  # L0 off: a repeat is an L1 hit
    first, _ = ask(service, unique, "Summarise support ticket 1042 in one line.")
    ask(service, unique, "Summarise support ticket 1043 in one line.")  # a look-alike: the first stage has work
    before, streaks = counted(), dict(service._streaks)  # noqa: SLF001
    plan, hit = ask(service, unique, "Summarise support ticket 1042 in one line.")
    assert hit is not None and hit.layer == "L1"
    assert counted() == before and plan.reason is None and plan.static_vector is None
    assert service._streaks == streaks  # noqa: SLF001
    # Nor does an L1 hit wait for (or fail with) a sync of the partition's index that has come due.
    assert first.partition is not None
    synced_at = service.semantic.index(first.partition, service.static.dim, time.time()).synced_at  # type: ignore
    time.sleep(SYNC_SECONDS + 0.05)
    _, hit = ask(service, unique, "Summarise support ticket 1042 in one line.")
    assert hit is not None and hit.layer == "L1"
    assert service.semantic._indexes[first.partition].synced_at == synced_at  # noqa: SLF001
    # A miss counts its stage once: one static embedding, one L2 miss (both look-alikes refused), no skip.
    before = counted()
    plan, miss = ask(service, unique, "Summarise support ticket 1044 in one line.")
    assert miss is None and plan.static_vector is not None and plan.reason is not None
    assert counted() == [before[0] + 1, before[1] + 1, *before[2:]]
