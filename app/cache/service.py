"""The cache's order of work: L0, then L1, then L2 on look-up; L1 (+ L0) and L2 on store.

It fails open: a Redis error makes the request a BYPASS (served by the upstream), opens a one-second
breaker so the following requests do not each wait for a dead Redis, and is logged and counted.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.breaker import Breaker
from app.cache.exact import EMBEDDINGS_PREFIX, ENTRY_PREFIX, ExactStore, Generations
from app.cache.keys import SemanticParts, digest, exact_key, semantic_parts
from app.cache.local import LocalCache, LocalEntry
from app.cache.semantic import SemanticStore
from app.cache.verify import candidate_floor, is_semantic_hit
from app.embeddings.base import Embedder, EmbeddingError
from app.errors import BadRequest
from app.observability import metrics
from app.redis_client import REDIS_FAILURES

log = logging.getLogger(__name__)

CACHEABLE_FINISH = frozenset({"stop", "tool_calls", "function_call"})
MAX_TTL_SECONDS = 30 * 86400
MISS, BYPASS = "MISS", "BYPASS"


@dataclass
class CachePlan:
    """What this request may do with the cache, decided from the request alone."""

    route: str
    tenant: str
    model: str
    body: dict[str, Any]
    lookup: bool
    store: bool
    ttl: int
    outcome: str = BYPASS
    key: str | None = None
    semantic: SemanticParts | None = None
    partition: str | None = None
    vector: np.ndarray | None = field(default=None, repr=False)


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
    semantic_threshold: float
    semantic_max_temperature: float


class CacheService:
    def __init__(self, redis_client: Any, options: CacheOptions, local: LocalCache,
                 embedder: Embedder | None) -> None:
        self.options = options
        self.local = local
        self.embedder = embedder if options.semantic_enabled else None
        self.exact = ExactStore(redis_client)
        self.semantic = SemanticStore(redis_client)
        self.generations = Generations(redis_client)
        self.breaker = Breaker()
        self.embedding_breaker = Breaker(pause_seconds=5.0)  # a failing embedding API is skipped, not waited on
        # Vectors of different models never share a partition, even at the same dimension.
        self._space = digest(self.embedder.model_id)[:8] if self.embedder is not None else ""

    # -- planning (no I/O) -------------------------------------------------------------------------------

    def plan(self, parsed: Any, tenant: str, cache_control: str | None, ttl_header: str | None) -> CachePlan:
        directives = {d.strip().lower() for d in (cache_control or "").split(",")}
        no_store = "no-store" in directives
        plan = CachePlan(
            route=parsed.route, tenant=tenant, model=parsed.model, body=parsed.body,
            lookup=not no_store and "no-cache" not in directives, store=not no_store,
            ttl=_ttl(ttl_header, self.options.ttl_seconds),
        )
        if no_store:
            return plan
        if self.embedder is not None and self._semantic_allowed(parsed.body):
            plan.semantic = semantic_parts(parsed.route, tenant, parsed.body)
        return plan

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
        if not self.breaker.available(now):
            return None
        try:
            if self.generations.refresh(now):
                self.local.clear()
                self.semantic.clear()
            plan.key = self._key(plan)
            plan.outcome = MISS
            if not plan.lookup:
                return None
            hit = self._exact(plan, now) or self._semantic(plan, now)
        except REDIS_FAILURES as exc:
            self._redis_failed(plan, exc, now)
            return None
        except ValueError as exc:  # an entry that is not the JSON we wrote: a miss, not an outage
            log.warning("unreadable cache entry ignored: %s", type(exc).__name__)
            plan.outcome = MISS
            return None
        self.breaker.succeeded()
        if hit is not None:
            plan.outcome = hit.layer
        return hit

    def _key(self, plan: CachePlan) -> str:
        tag = self.generations.tag(plan.tenant, plan.model)
        prefix = EMBEDDINGS_PREFIX if plan.route == "embeddings" else ENTRY_PREFIX
        if plan.semantic is not None:
            plan.partition = f"{tag}:{self._space}:{plan.semantic.partition}"
        return f"{prefix}{tag}:{exact_key(plan.route, plan.tenant, plan.body)}"

    def _exact(self, plan: CachePlan, now: float) -> CacheHit | None:
        assert plan.key is not None
        entry = self.local.get(plan.key, now)
        if entry is not None:
            metrics.CACHE_LOOKUPS.labels("L0", "hit").inc()
            return CacheHit("L0", entry.content, entry.answer)
        if self.local.enabled:
            metrics.CACHE_LOOKUPS.labels("L0", "miss").inc()
        found = self.exact.get(plan.key)
        if found is None:
            metrics.CACHE_LOOKUPS.labels("L1", "miss").inc()
            return None
        content, expires_at = found
        answer = _stored_answer(content)
        self.local.put(plan.key, LocalEntry(content, answer, expires_at))
        metrics.CACHE_LOOKUPS.labels("L1", "hit").inc()
        return CacheHit("L1", content, answer)

    def _semantic(self, plan: CachePlan, now: float) -> CacheHit | None:
        if plan.semantic is None or plan.partition is None or self.embedder is None:
            return None
        vector = self._embed(plan.semantic.text)
        if vector is None:
            plan.semantic = None  # no second wait on a failing embedder to store: this answer skips L2
            return None
        plan.vector = vector
        index = self.semantic.index(plan.partition, vector.shape[0], now)
        threshold = self.options.semantic_threshold
        found = index.search(vector, candidate_floor(threshold))
        if found.best is not None:
            metrics.SEMANTIC_SIMILARITY.observe(max(found.best, 0.0))
        for candidate in found.candidates:
            verdict = is_semantic_hit(candidate.similarity, plan.semantic.text, candidate.text, threshold)
            if not verdict.ok:
                log.debug("L2 candidate rejected: %s", verdict.reason)
                continue
            content = self.semantic.confirm(plan.partition, candidate.entry_id)
            if content is None:
                continue
            answer = _stored_answer(content)
            metrics.CACHE_LOOKUPS.labels("L2", "hit").inc()
            return CacheHit("L2", content, answer, round(candidate.similarity, 4))
        metrics.CACHE_LOOKUPS.labels("L2", "miss").inc()
        return None

    def _embed(self, text: str) -> np.ndarray | None:
        assert self.embedder is not None
        started = time.perf_counter()
        if not self.embedding_breaker.available(time.time()):
            metrics.CACHE_LOOKUPS.labels("L2", "error").inc()
            return None
        try:
            vector = self.embedder.embed([text])[0]
        except EmbeddingError as exc:
            self.embedding_breaker.failed(time.time())
            metrics.CACHE_LOOKUPS.labels("L2", "error").inc()
            log.warning("embedding failed, semantic look-ups skipped for %.0fs: %s",
                        self.embedding_breaker.pause_seconds, exc)
            return None
        self.embedding_breaker.succeeded()
        metrics.EMBEDDING_DURATION.observe(time.perf_counter() - started)
        return vector

    # -- store -------------------------------------------------------------------------------------------

    def store(self, plan: CachePlan, answer: dict[str, Any], content: bytes | None) -> None:
        """Keep a complete answer (never an error, a cut or a partial one) in L1, L0 and, if planned, L2."""
        if not plan.store or plan.key is None or not _complete(plan.route, answer):
            return
        now = time.time()
        if not self.breaker.available(now):
            return
        if content is None:
            content = json.dumps(answer, separators=(",", ":")).encode()
        try:
            expires_at = self.exact.put(plan.key, content, plan.ttl)
            self.local.put(plan.key, LocalEntry(content, answer, expires_at))
            if plan.semantic is not None and plan.partition is not None:
                vector = plan.vector if plan.vector is not None else self._embed(plan.semantic.text)
                if vector is not None:
                    entry_id = plan.key.rsplit(":", 1)[-1][:32]
                    self.semantic.put(plan.partition, entry_id, vector, plan.semantic.text, content, plan.ttl)
        except REDIS_FAILURES as exc:  # a failed store only costs a future miss
            self._redis_failed(plan, exc, now)
            return
        self.breaker.succeeded()

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
            "l2": {**self.semantic.stats(), "enabled": self.embedder is not None,
                   "threshold": self.options.semantic_threshold},
            "generations": self.generations.snapshot(),
            "ttl_seconds": self.options.ttl_seconds,
        }

    def _redis_failed(self, plan: CachePlan, exc: Exception, now: float) -> None:
        first = self.breaker.available(now)
        self.breaker.failed(now)
        plan.outcome = BYPASS
        metrics.REDIS_ERRORS.labels("cache").inc()
        if first:
            log.warning("Redis unavailable, cache bypassed for %.0fs: %s", self.breaker.pause_seconds,
                        type(exc).__name__)


def _stored_answer(content: bytes) -> dict[str, Any]:
    """A stored answer, parsed; ValueError for anything the gateway did not write (lookup makes it a miss)."""
    answer = json.loads(content)
    if not isinstance(answer, dict):
        raise ValueError("a cache entry that is not a JSON object")
    return answer


def _complete(route: str, answer: dict[str, Any]) -> bool:
    if "error" in answer:
        return False
    if route == "embeddings":
        return isinstance(answer.get("data"), list) and bool(answer["data"])
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    if not all(isinstance(c, dict) and c.get("finish_reason") in CACHEABLE_FINISH for c in choices):
        return False
    # Only an answer the replay can turn back into a stream: a chat choice needs its message object.
    return route != "chat" or all(isinstance(c.get("message"), dict) for c in choices)


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
