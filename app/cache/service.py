"""The cache's order of work: L0, then L1, then L2 on look-up; L1 (+ L0) and L2 on store.

It fails open: a Redis error makes the request a BYPASS (served by the upstream), opens a one-second
breaker so the following requests do not each wait for a dead Redis, and is logged and counted.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.api import CHAT, CLEAN_FINISH, EMBEDDINGS, ParsedRequest
from app.breaker import Breaker
from app.cache.exact import EMBEDDINGS_PREFIX, ENTRY_PREFIX, ExactStore, Generations
from app.cache.keys import SemanticParts, digest, exact_key, semantic_parts
from app.cache.lexicon import verifier_model
from app.cache.local import LocalCache, LocalEntry
from app.cache.semantic import Candidate, IndexBounds, PartitionIndex, SemanticStore
from app.cache.verify import decide, normalise, repair_typos, rule_check
from app.cache.write_behind import WriteBehind
from app.concurrency import BackgroundQueue, new_event
from app.embeddings.base import Embedder, EmbeddingError
from app.embeddings.static import StaticEmbedder
from app.errors import BadRequest
from app.observability import metrics, tracing
from app.redis_client import REDIS_FAILURES, RedisBudget, RedisClient, bounded, opens_breaker

log = logging.getLogger(__name__)

MAX_TTL_SECONDS = 30 * 86400
MISS, BYPASS = "MISS", "BYPASS"
#: Prompts longer than this many tokens are past what the transformer reads (it truncates at 256): two prompts that
#: differ after that point would look the same to it, so L2 is not used for them.
SEMANTIC_MAX_TOKENS = 256
#: How long a request that needs the transformer waits for the worker to load it (once, on first need).
MODEL_LOAD_WAIT_SECONDS = 5.0
#: A partition whose last COLD_AFTER L2 look-ups in this worker found nothing is cold: where L2 does not pay, only
#: one request in COLD_SAMPLE looks it up and writes its entry (any hit makes it warm again at once).
COLD_AFTER = 256
COLD_SAMPLE = 8
COLD_TRACKED = 4096  # partitions whose miss streak a worker remembers
#: A partition with an L2 hit this recent is warm: its new entries get their transformer vector in the background
#: (off the client's time), so the paraphrase that comes next embeds only itself. The hit's worker marks the
#: partition warm in Redis (at most every WARM_MARK_EVERY seconds), so every worker's new entries get it.
WARM_SECONDS = 600.0
WARM_MARK_EVERY = 60.0


@dataclass
class CachePlan:
    """What this request may do with the cache, and what its look-up found, for its store.

    The fields up to `redis_budget` are decided by `CacheService.plan` from the request alone and never change;
    the rest are written by `CacheService.lookup` only (the outcome and the reason for the log line, the keys,
    the vectors the store reuses), from values its helpers return.
    """

    route: str
    tenant: str
    model: str
    body: dict[str, Any]
    lookup: bool
    store: bool
    ttl: int
    threshold: float = 1.0
    semantic: SemanticParts | None = None  # the text L2 compares and the partition's hash; None: no L2
    redis_budget: RedisBudget | None = field(default=None, repr=False)  # the request's Redis time
    outcome: str = BYPASS
    key: str | None = None
    partition: str | None = None
    l2_store: bool = True  # False when the look-up found this answer must not enter L2 (cold, too long, no model)
    text: str | None = None  # the normalised last user turn, once the look-up computed it (the store reuses it)
    static_vector: np.ndarray | None = field(default=None, repr=False)
    vector: np.ndarray | None = field(default=None, repr=False)
    learned: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # candidates' transformer vectors
    reason: str | None = None  # the L2 decision, for the log line


@dataclass
class L2Stage:
    """L2's first stage for one look-up, computed while L1's GET travels and applied (counted, remembered) only if
    L1 misses: an L1 hit leaves no trace of it."""

    text: str = ""  # the normalised last user turn, once the stage ran
    index: PartitionIndex | None = field(default=None, repr=False)  # the index the stage searched, once it ran
    synced_at: float = 0.0  # that index's last sync when it was searched
    too_long: bool = False
    static_vector: np.ndarray | None = field(default=None, repr=False)
    found: list[Candidate] = field(default_factory=list)
    survivors: list[Candidate] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (rule, reason) of each candidate dropped


@dataclass(frozen=True)
class CacheHit:
    layer: str
    content: bytes
    answer: dict[str, Any]
    similarity: float | None = None


@dataclass(frozen=True)
class CacheOptions:
    ttl_seconds: int
    semantic_enabled: bool
    semantic_threshold: float | None  # None: the verifier's measured default
    semantic_max_temperature: float
    index_bounds: IndexBounds = IndexBounds(max_rows=100_000, max_bytes=64 * 1024 * 1024)
    store_queue_size: int = 1000
    max_entry_bytes: int = 2 * 1024 * 1024  # CACHE_MAX_ENTRY_BYTES: larger answers are passed on, never stored
    outage_local_seconds: float = 30.0  # LOCAL_CACHE_OUTAGE_SECONDS: how long L0 answers while Redis is out of reach


@dataclass(frozen=True)
class SemanticWrite:
    """L2 work to do after the answer has gone (plain data for the background queue): the new entry, if any,
    and the transformer vectors computed for candidates, kept so the next look-up does not compute them again."""

    partition: str
    learned: dict[str, np.ndarray]
    mark_warm: bool = False  # tell the other workers the partition is warm
    entry_id: str | None = None
    embed: bool = False  # compute the transformer vector too (the partition is warm)
    text: str = ""
    static_vector: np.ndarray | None = None
    vector: np.ndarray | None = None
    content: bytes = b""
    ttl: int = 0


class CacheService:
    def __init__(self, redis_client: RedisClient, options: CacheOptions, local: LocalCache,
                 embedder: Embedder | None, static: StaticEmbedder | None = None,
                 breaker: Breaker | None = None, background: bool | None = None) -> None:
        self.options = options
        self.local = local
        self.embedder = embedder if options.semantic_enabled and static is not None else None
        self.static = static if self.embedder is not None else None
        self.threshold = (options.semantic_threshold if options.semantic_threshold is not None
                          else verifier_model().default_threshold)
        # L1 SETs and L2 entries wait for the worker's next look-up, whose GET carries them (one round trip).
        self.write_behind = WriteBehind(redis_client, on_drop=metrics.BACKGROUND_DROPPED.labels("cache_writes").inc)
        self.exact = ExactStore(redis_client, self.write_behind, on_error=lambda exc: self._store_failed("L1", exc))
        self._l2_write_failed = lambda exc: self._store_failed("L2", exc)  # one reporter: once per round trip
        self.semantic = SemanticStore(redis_client, options.index_bounds, self.write_behind)
        self.generations = Generations(redis_client)
        self.breaker = breaker or Breaker()  # the worker's Redis breaker, shared with the limiter
        self.embedding_breaker = Breaker(pause_seconds=5.0)  # a failing embedding API is skipped, not waited on
        self.writes = BackgroundQueue("semantic_store", self._write_semantic, options.store_queue_size,
                                      on_drop=metrics.BACKGROUND_DROPPED.labels("semantic_store").inc,
                                      background=background)
        self.load_jobs = BackgroundQueue("model_load", self._load_transformer, 1, background=background)
        self._loading = False
        self._streaks: OrderedDict[str, int] = OrderedDict()  # partition -> L2 look-ups since its last hit
        self._last_hit: OrderedDict[str, float] = OrderedDict()  # partition -> time of its last L2 hit
        self._loaded: Any = None
        if self.load_jobs.background:
            self._loaded = new_event()
        # Vectors of different models never share a partition.
        self._space = digest([self.embedder.model_id, self.static.model_id])[:8] if self.embedder is not None else ""

    # -- planning (no I/O) -------------------------------------------------------------------------------

    def plan(self, parsed: ParsedRequest, tenant: str, cache_control: str | None, ttl_header: str | None,
             min_similarity: str | None = None, budget: RedisBudget | None = None) -> CachePlan:
        """What this request may do with the cache, from the request alone (no I/O); `budget` is the request's
        Redis time, which its look-up and its store share."""
        directives = {d.strip().lower() for d in (cache_control or "").split(",")}
        # `store: true` asks the provider to keep this completion (its id can be fetched later): only a request
        # sent upstream does that, so such a request neither reads nor writes the cache.
        no_store = "no-store" in directives or parsed.body.get("store") is True
        ttl = _ttl(ttl_header, self.options.ttl_seconds)
        threshold = max(self.threshold, _min_similarity(min_similarity))
        semantic = None
        if not no_store and self.embedder is not None and self._semantic_allowed(parsed.body):
            semantic = semantic_parts(parsed.route, tenant, parsed.body)
        return CachePlan(
            route=parsed.route, tenant=tenant, model=parsed.model, body=parsed.body,
            lookup=not no_store and "no-cache" not in directives, store=not no_store, ttl=ttl, threshold=threshold,
            semantic=semantic, redis_budget=budget,
        )

    def _semantic_allowed(self, body: dict[str, Any]) -> bool:
        """A paraphrase may share an answer only when the client did not ask for variety.

        No temperature means the provider's default sampling (1.0 at OpenAI and DeepSeek), so no L2.
        """
        temperature = body.get("temperature")
        if temperature is None:
            temperature = 1.0
        n = body.get("n") or 1
        return temperature <= self.options.semantic_max_temperature and n == 1

    # -- look-up -----------------------------------------------------------------------------------------

    def lookup(self, plan: CachePlan) -> CacheHit | None:
        if not plan.store and not plan.lookup:
            return None
        now = time.time()
        if _spent(plan.redis_budget) or not self.breaker.available(now):
            return self._local_during_outage(plan)
        try:
            with bounded(plan.redis_budget):
                if self.generations.refresh(now):
                    self.local.clear()
                    self.semantic.clear()
                plan.key, plan.partition = self._keys(plan)
                plan.outcome = MISS
                if not plan.lookup:
                    self.breaker.succeeded(now)
                    return None
                hit, stage = self._exact(plan, now)
            if hit is None and stage is not None:
                hit = self._semantic(plan, stage, now)
        except REDIS_FAILURES as exc:
            self._redis_failed(plan, exc, now)
            return self._local_during_outage(plan)
        except ValueError as exc:  # an entry that is not the JSON we wrote: a miss, not an outage
            log.warning("unreadable cache entry ignored: %s", type(exc).__name__)
            plan.outcome = MISS
            return None
        self.breaker.succeeded(now)
        if hit is not None:
            plan.outcome = hit.layer
        return hit

    def _local_during_outage(self, plan: CachePlan) -> CacheHit | None:
        """While Redis is out of reach (or this request's Redis time is spent), L0 alone still answers.

        Only for `outage_local_seconds` after this worker last read the generation counters: a deletion made
        meanwhile (by a worker that can reach Redis) reaches this one at most that late, as it does within
        REFRESH_SECONDS when Redis is well. Entries keep their own expiry. Nothing is stored: the store meets the
        same open breaker or spent budget. A request that L0 cannot answer is a BYPASS, as before.
        """
        bound = self.options.outage_local_seconds
        now = time.time()  # not the look-up's start: its Redis wait must not stretch the bound
        if not plan.lookup or bound <= 0 or self.generations.age(now) > bound:
            return None
        hit = self._local(self._keys(plan)[0], now)
        if hit is not None:
            plan.outcome = hit.layer
        return hit

    def _keys(self, plan: CachePlan) -> tuple[str, str | None]:
        """The exact key and, when L2 applies, the partition: both carry the scope's generation."""
        tag = self.generations.tag(plan.tenant, plan.model)
        prefix = EMBEDDINGS_PREFIX if plan.route == EMBEDDINGS else ENTRY_PREFIX
        partition = f"{tag}:{self._space}:{plan.semantic.partition}" if plan.semantic is not None else None
        return f"{prefix}{tag}:{exact_key(plan.route, plan.tenant, plan.body)}", partition

    def _local(self, key: str, now: float) -> CacheHit | None:
        """L0: this worker's own copy, counted as a hit or (when L0 is on) a miss."""
        entry = self.local.get(key, now)
        if entry is not None:
            metrics.child(metrics.CACHE_LOOKUPS, "L0", "hit").inc()
            return CacheHit("L0", entry.content, entry.answer)
        if self.local.enabled:
            metrics.child(metrics.CACHE_LOOKUPS, "L0", "miss").inc()
        return None

    def _exact(self, plan: CachePlan, now: float) -> tuple[CacheHit | None, L2Stage | None]:
        """L0, then L1; while L1's GET travels, L2's first stage (pure CPU: the query's static vector, the search,
        the lexical rules), which only an L1 miss uses (`_semantic`). The round trip is mostly waiting for Redis,
        so the first stage costs a new prompt almost no time of its own."""
        assert plan.key is not None
        hit = self._local(plan.key, now)
        if hit is not None:
            return hit, None
        stage = L2Stage() if self._l2_applies(plan) else None
        fresh = self._fresh_l2_index(plan, now) if stage is not None else None
        read = self.exact.send_get(plan.key)
        try:
            if stage is not None and fresh is not None:
                self._l2_first(plan, stage, fresh, now)
        except BaseException:
            with suppress(*REDIS_FAILURES):
                read()  # gives the connection back; the stage's own error is the one raised
            raise
        found = read()
        if found is None:
            metrics.child(metrics.CACHE_LOOKUPS, "L1", "miss").inc()
            return None, stage
        content, expires_at = found
        answer = _stored_answer(content)
        self.local.put(plan.key, LocalEntry(content, answer, expires_at))
        metrics.child(metrics.CACHE_LOOKUPS, "L1", "hit").inc()
        return CacheHit("L1", content, answer), None

    def _l2_applies(self, plan: CachePlan) -> bool:
        return plan.semantic is not None and plan.partition is not None and self.static is not None

    def _fresh_l2_index(self, plan: CachePlan, now: float) -> PartitionIndex | None:
        """The index to search while L1's GET travels, from what the worker holds (no I/O, nothing counted): only
        where the first stage is likely to be used, a partition that is not cold and whose index needs no sync and
        has rows. Otherwise `_semantic` syncs and runs the stage after an L1 miss."""
        assert plan.partition is not None and self.static is not None
        if self._cold(self._streaks.get(plan.partition, 0) + 1):
            return None
        index = self.semantic.fresh_index(plan.partition, self.static.dim, now)
        return index if index is not None and len(index) else None

    def _l2_first(self, plan: CachePlan, stage: L2Stage, index: PartitionIndex, now: float) -> None:
        """The cascade's cheap stages on `index`, without side effects (they are counted only if L1 misses): the
        static vector, the index's best candidates, and the lexical rules that drop look-alikes."""
        assert plan.semantic is not None and self.static is not None
        stage.text = stage.text or normalise(plan.semantic.text)
        stage.index, stage.synced_at, stage.found, stage.survivors, stage.refused = index, index.synced_at, [], [], []
        vectors, (tokens,) = self.static.embed_counted([stage.text])
        stage.static_vector = vectors[0]
        stage.too_long = tokens > SEMANTIC_MAX_TOKENS
        if stage.too_long:
            return
        stage.found = index.search(stage.static_vector, verifier_model().static_floor, now)
        for candidate in stage.found:
            refused = rule_check(stage.text, candidate.text, candidate.static_similarity)
            if refused is None:
                stage.survivors.append(candidate)
            else:
                stage.refused.append((refused.rule, refused.reason))

    @staticmethod
    def _cold(streak: int) -> bool:
        """A partition whose last COLD_AFTER look-ups found nothing is looked up one request in COLD_SAMPLE."""
        return streak > COLD_AFTER and bool(streak % COLD_SAMPLE)

    def _semantic(self, plan: CachePlan, stage: L2Stage, now: float) -> CacheHit | None:
        """The cascade after an L1 miss: the first stage (run now if L1's GET did not carry it, or run again if the
        index was synced since), its outcome counted, and the transformer for survivors.

        Each stage runs only when the one before left something to look at, so a new prompt with no near
        neighbour costs a table look-up, and one in an empty partition not even that.
        """
        assert plan.partition is not None and self.static is not None
        streak = self._streaks.pop(plan.partition, 0) + 1  # read now: other look-ups ran while the GET travelled
        self._streaks[plan.partition] = streak  # most recently used last
        if len(self._streaks) > COLD_TRACKED:
            self._streaks.popitem(last=False)
        if self._cold(streak):
            plan.l2_store = False  # nor written: a partition where L2 has not paid for a long time
            return self._skip(plan, "cold_partition")
        index = self.semantic.index(plan.partition, self.static.dim, now)  # synced with Redis when due
        if not len(index):
            return self._skip(plan, "empty_partition")
        if stage.index is not index or stage.synced_at != index.synced_at:  # not run, or the index synced since
            self._l2_first(plan, stage, index, now)
        metrics.child(metrics.EMBEDDINGS, "static").inc()
        if stage.too_long:
            plan.l2_store = False  # nor stored: a later prompt could never be told apart from it
            return self._skip(plan, "too_long")
        plan.text, plan.static_vector = stage.text, stage.static_vector
        for rule, reason in stage.refused:
            self._refused(plan, rule, reason)
        if not stage.survivors:
            if not stage.found:
                self._skip(plan, "no_candidate")
            metrics.child(metrics.CACHE_LOOKUPS, "L2", "miss").inc()
            return None
        return self._verify(plan, stage.text, stage.survivors)

    def _verify(self, plan: CachePlan, text: str, survivors: list[Candidate]) -> CacheHit | None:
        assert plan.partition is not None
        if not self._transformer_ready():
            return self._skip(plan, "model_loading")
        stored = self.semantic.candidates(plan.partition, [c.entry_id for c in survivors])
        present = [(candidate, vector, content) for candidate, (vector, content) in zip(survivors, stored, strict=True)
                   if content is not None]  # the others left Redis since this worker's last sync
        if not present:  # nothing left to compare with: no model run
            metrics.child(metrics.CACHE_LOOKUPS, "L2", "miss").inc()
            return None
        query = self._embed([text])
        if query is None:
            plan.l2_store = False  # no second wait on a failing embedder to store: this answer skips L2
            return None
        plan.vector = query[0]
        best: float | None = None
        # Best static candidate first; a candidate's vector (and a typo-repaired query) is computed only when
        # reached, so a hit on the first candidate costs one or two model runs, not one per survivor.
        for candidate, vector, content in present:
            if vector is None:
                computed = self._embed([candidate.text])
                if computed is None:
                    return None
                vector = plan.learned[candidate.entry_id] = computed[0]
            similarity = float(plan.vector @ vector)
            verdict = decide(text, candidate.text, similarity=similarity,
                             static_similarity=candidate.static_similarity, threshold=plan.threshold)
            repair = None if verdict.ok else repair_typos(text, candidate.text)
            if repair is not None:  # only when it could change the answer: one more model run
                repaired = self._embed([repair])
                repaired_similarity = float(repaired[0] @ vector) if repaired is not None else similarity
                if repaired_similarity > similarity:
                    similarity = repaired_similarity
                    verdict = decide(text, candidate.text, similarity=similarity,
                                     static_similarity=candidate.static_similarity, threshold=plan.threshold)
            best = similarity if best is None else max(best, similarity)
            if not verdict.ok:
                self._refused(plan, verdict.rule, verdict.reason)
                continue
            answer = _stored_answer(content)
            metrics.child(metrics.SEMANTIC_DECISIONS, "served").inc()
            metrics.SEMANTIC_SIMILARITY.observe(max(similarity, 0.0))
            metrics.child(metrics.CACHE_LOOKUPS, "L2", "hit").inc()
            plan.reason = verdict.reason
            self._streaks[plan.partition] = 0
            hit_at = time.time()
            mark = self._last_hit.get(plan.partition, 0.0) <= hit_at - WARM_MARK_EVERY
            self._last_hit[plan.partition] = hit_at
            self._last_hit.move_to_end(plan.partition)
            if len(self._last_hit) > COLD_TRACKED:
                self._last_hit.popitem(last=False)
            if plan.learned or mark:
                self.writes.offer(SemanticWrite(partition=plan.partition, learned=dict(plan.learned), mark_warm=mark))
            return CacheHit("L2", content, answer, round(similarity, 4))
        if best is not None:
            metrics.SEMANTIC_SIMILARITY.observe(max(best, 0.0))
        metrics.child(metrics.CACHE_LOOKUPS, "L2", "miss").inc()
        return None

    def warm_up(self) -> None:
        """Start loading a local transformer in the background (the worker serves meanwhile); inline outside gevent."""
        if self.embedder is not None and not getattr(self.embedder, "loaded", True) and not self._loading:
            self._loading = True
            self.load_jobs.offer(None)

    def _transformer_ready(self) -> bool:
        """Whether the transformer can run now. It loads on a worker's first need, in the background; the requests
        that need it meanwhile wait for the load, up to MODEL_LOAD_WAIT_SECONDS, then are plain misses."""
        if getattr(self.embedder, "loaded", True):
            return True
        self.warm_up()
        if self._loaded is not None:
            self._loaded.wait(MODEL_LOAD_WAIT_SECONDS)
        return bool(getattr(self.embedder, "loaded", True))

    def _load_transformer(self, _: None) -> None:
        try:
            self.embedder.load()  # type: ignore[union-attr]
        except EmbeddingError as exc:
            self.embedding_breaker.failed(time.time())
            log.warning("the local embedding model could not be loaded: %s", exc)
        finally:
            self._loading = False
            if self._loaded is not None:
                self._loaded.set()

    def _skip(self, plan: CachePlan, reason: str) -> None:
        metrics.child(metrics.SEMANTIC_SKIPPED, reason).inc()
        plan.reason = reason
        return None

    def _refused(self, plan: CachePlan, rule: str, reason: str) -> None:
        metrics.child(metrics.SEMANTIC_DECISIONS, rule).inc()
        if plan.reason is None:  # the best candidate's reason is the one worth a log line
            plan.reason = reason
        log.debug("L2 candidate refused: %s", reason)

    def _embed(self, texts: list[str]) -> np.ndarray | None:
        assert self.embedder is not None
        started = time.perf_counter()
        if not self.embedding_breaker.available(time.time()):
            metrics.CACHE_LOOKUPS.labels("L2", "error").inc()
            return None
        try:
            with tracing.embedding(self.embedder, len(texts)):
                vectors = self.embedder.embed(texts)
        except EmbeddingError as exc:
            self.embedding_breaker.failed(time.time())
            metrics.CACHE_LOOKUPS.labels("L2", "error").inc()
            log.warning("embedding failed, semantic look-ups skipped for %.0fs: %s",
                        self.embedding_breaker.pause_seconds, exc)
            return None
        self.embedding_breaker.succeeded()
        metrics.child(metrics.EMBEDDINGS, "transformer").inc(len(texts))
        metrics.EMBEDDING_DURATION.observe(time.perf_counter() - started)
        return vectors

    # -- store -------------------------------------------------------------------------------------------

    def store(self, plan: CachePlan, answer: dict[str, Any], content: bytes | None) -> None:
        """Keep a complete answer (never an error, a cut or a partial one) in L1, L0 and, if planned, L2."""
        if not plan.store or plan.key is None or not _complete(plan.route, answer):
            return
        now = time.time()
        if _spent(plan.redis_budget) or not self.breaker.available(now):
            return
        if content is None:
            content = json.dumps(answer, separators=(",", ":")).encode()
        if len(content) > self.options.max_entry_bytes:  # in no layer: L0's byte bound holds, Redis stays small
            return
        try:
            # No Redis budget around it: in a gevent worker the SET only waits for the next look-up's pipeline (or
            # its own flush, after the answer), so this call does no I/O; elsewhere (tests, tools) it is sent now.
            expires_at = self.exact.put(plan.key, content, plan.ttl)
            self.local.put(plan.key, LocalEntry(content, answer, expires_at))
        except REDIS_FAILURES as exc:  # a failed store only costs a future miss
            self._redis_failed(plan, exc, now)
            return
        self.breaker.succeeded(now)
        if plan.semantic is not None and plan.l2_store and plan.partition is not None:
            # Its vectors are only for later requests: computed and written after this answer has gone.
            self.writes.offer(SemanticWrite(
                partition=plan.partition, entry_id=plan.key.rsplit(":", 1)[-1][:32],
                text=plan.text or normalise(plan.semantic.text), static_vector=plan.static_vector, vector=plan.vector,
                learned=dict(plan.learned), content=content, ttl=plan.ttl,
                embed=plan.vector is None and self._warm(plan.partition, now),
            ))

    def _store_failed(self, layer: str, exc: Exception) -> None:
        """A store that failed after its answer had gone (an L1 SET, see ExactStore, or an L2 write): a future
        miss, counted and logged."""
        if opens_breaker(exc):
            self.breaker.failed(time.time())
        metrics.REDIS_ERRORS.labels("cache").inc()
        log.warning("%s store failed: %s", layer, type(exc).__name__)

    def _warm(self, partition: str, now: float) -> bool:
        """A hit here lately, in this worker or (as of the last sync) in any other."""
        return self._last_hit.get(partition, 0.0) > now - WARM_SECONDS or self.semantic.is_warm(partition)

    def _write_semantic(self, job: SemanticWrite) -> None:
        """The background half of a store: the static vector if the look-up did not need one, then Redis."""
        assert self.static is not None
        if not self.breaker.available(time.time()):
            return
        static = job.static_vector
        if static is None and job.entry_id is not None:
            vectors, (tokens,) = self.static.embed_counted([job.text])
            metrics.child(metrics.EMBEDDINGS, "static").inc()
            if tokens <= SEMANTIC_MAX_TOKENS:  # past what the transformer reads, nothing could be told apart
                static = vectors[0]
        vector = job.vector
        if job.embed and static is not None and self._transformer_ready():
            embedded = self._embed([job.text])
            vector = embedded[0] if embedded is not None else None
        try:
            if job.entry_id is not None and static is not None:
                self.semantic.put(job.partition, job.entry_id, static, vector, job.text, job.content, job.ttl,
                                  on_error=self._l2_write_failed)
            if job.learned:
                self.semantic.remember_transformer_vectors(job.partition, job.learned)
            if job.mark_warm:
                self.semantic.mark_warm(job.partition, int(WARM_SECONDS))
        except REDIS_FAILURES as exc:
            self._store_failed("L2", exc)
            return
        stats = self.semantic.stats()
        metrics.SEMANTIC_INDEX_ROWS.set(stats["rows"])
        metrics.SEMANTIC_INDEX_BYTES.set(stats["bytes"])

    # -- admin -------------------------------------------------------------------------------------------

    def invalidate(self, *, tenant: str | None = None, model: str | None = None) -> str:
        """Make entries unreachable everywhere at once; they leave Redis with their TTL."""
        scope = f"t:{tenant}" if tenant else f"m:{model}" if model else "*"
        self.generations.bump(scope)
        self.local.clear()
        self.semantic.clear()
        return scope

    def stats(self) -> dict[str, Any]:
        return {
            "l0": {"entries": len(self.local), "bytes": self.local.size_bytes, "max_entries": self.local.max_entries},
            # L1 SETs and L2 entries waiting for the next look-up (≤ 5 ms), and those dropped because too many waited
            "writes": {"pending": self.write_behind.pending(), "dropped": self.write_behind.dropped},
            "l2": {**self.semantic.stats(), "enabled": self.embedder is not None,
                   "threshold": self.threshold, "store_queue": self.writes.pending(),
                   "store_dropped": self.writes.dropped},
            "generations": self.generations.snapshot(),
            "ttl_seconds": self.options.ttl_seconds,
        }

    def _redis_failed(self, plan: CachePlan, exc: Exception, now: float) -> None:
        first = self.breaker.closed and opens_breaker(exc)
        if opens_breaker(exc):  # not when only this request's Redis budget ran out
            self.breaker.failed(time.time())
        plan.outcome = BYPASS
        metrics.REDIS_ERRORS.labels("cache").inc()
        if first:
            log.warning("Redis unavailable, cache bypassed for %.0fs: %s", self.breaker.pause_seconds,
                        type(exc).__name__)


def _spent(budget: RedisBudget | None) -> bool:
    return budget is not None and budget.spent


def _stored_answer(content: bytes) -> dict[str, Any]:
    """A stored answer, parsed; ValueError for anything the gateway did not write (lookup makes it a miss)."""
    answer = json.loads(content)
    if not isinstance(answer, dict):
        raise ValueError("a cache entry that is not a JSON object")
    return answer


def _complete(route: str, answer: dict[str, Any]) -> bool:
    if "error" in answer:
        return False
    if route == EMBEDDINGS:
        return isinstance(answer.get("data"), list) and bool(answer["data"])
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    if not all(isinstance(c, dict) and c.get("finish_reason") in CLEAN_FINISH for c in choices):
        return False
    # Only an answer the replay can turn back into a stream: a chat choice needs its message object.
    return route != CHAT or all(isinstance(c.get("message"), dict) for c in choices)


def _min_similarity(header: str | None) -> float:
    """``X-Cache-Min-Similarity``: a request may raise its own L2 bar, never lower it (0 = no tightening)."""
    if header is None or not header.strip():
        return 0.0
    try:
        value = float(header)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise BadRequest("X-Cache-Min-Similarity must be a number between 0 and 1.", code="invalid_min_similarity")
    return value


def _ttl(header: str | None, default: int) -> int:
    if header is None or not header.strip():
        return default
    try:
        ttl = int(header)
    except ValueError:
        raise BadRequest("X-Cache-TTL must be a whole number of seconds.", code="invalid_cache_ttl") from None
    if not 1 <= ttl <= MAX_TTL_SECONDS:
        raise BadRequest(f"X-Cache-TTL must be between 1 and {MAX_TTL_SECONDS}.", code="invalid_cache_ttl")
    return ttl
