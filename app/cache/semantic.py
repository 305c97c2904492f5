"""L2: vectors in Redis (little-endian float32), a numpy index per partition in each worker.

Redis layout, all keys of one partition under one hash tag (one cluster slot):
  gw:s:{<partition>}:log        ZSET  entry id -> time written (ms); what workers sync from
  gw:s:{<partition>}:e:<id>     HASH  v = float32 LE bytes, q = the embedded text, a = the answer JSON
The worker syncs a partition at most every SYNC_SECONDS (one ZRANGEBYSCORE for what is new, one
pipelined HMGET for those vectors), searches with one matrix-vector product, and confirms a hit by
reading the answer from Redis: an expired or deleted entry is never served.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

SYNC_SECONDS = 0.5
CANDIDATES = 3  # best-scoring candidates verified per look-up, best first
# Up to this many rows one float32 matrix-vector product is the fastest search. Past it the matrix no longer fits
# in the CPU caches (100k rows = 150 MB: 20-40 ms per scan, memory-bound), so a 1-bit sketch per row (the signs,
# 48 bytes at 384 dimensions) shortlists SHORTLIST rows by Hamming distance, and only those are scored exactly.
EXACT_ROWS = 8192
SHORTLIST = 1024
MAX_ROWS_PER_WORKER = 200_000  # about 300 MB at 384 dimensions; least recently used partitions go first
LOG_TRIM_EVERY = 64

FLOAT32_LE = np.dtype("<f4")


def encode_vector(vector: np.ndarray) -> bytes:
    """`[4 bytes] * dim`, little-endian float32, whatever the machine's byte order."""
    return np.ascontiguousarray(vector, dtype=FLOAT32_LE).tobytes()


def decode_vector(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=FLOAT32_LE).astype(np.float32)


@dataclass(frozen=True)
class Candidate:
    entry_id: str
    text: str
    similarity: float


@dataclass(frozen=True)
class SearchResult:
    candidates: list[Candidate]
    best: float | None  # the best similarity seen, for the similarity histogram


def sign_sketch(vectors: np.ndarray) -> np.ndarray:
    """Rows of sign bits packed into uint64 words (padded): Hamming distance tracks the angle."""
    bits = np.packbits(vectors > 0, axis=-1)
    pad = (-bits.shape[-1]) % 8
    if pad:
        bits = np.concatenate([bits, np.zeros((*bits.shape[:-1], pad), dtype=np.uint8)], axis=-1)
    return np.ascontiguousarray(bits).view(np.uint64)


class PartitionIndex:
    """The vectors of one partition held by this worker: a growing float32 matrix of unit rows."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._matrix = np.zeros((16, dim), dtype=np.float32)
        # Word-major (words x rows): each word's column of rows is contiguous, so the Hamming pass is a few
        # vectorised sweeps instead of a strided reduction.
        self._sketch = np.zeros((sign_sketch(np.zeros((1, dim), dtype=np.float32)).shape[1], 16), dtype=np.uint64)
        self._ids: list[str] = []
        self._texts: list[str] = []
        self._alive = np.zeros(16, dtype=bool)
        self._positions: dict[str, int] = {}
        self.synced_at = 0.0
        self.synced_score = 0.0

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._positions

    def add(self, entry_id: str, vector: np.ndarray, text: str) -> None:
        if entry_id in self._positions or vector.shape != (self.dim,):
            return
        row = len(self._ids)
        if row == self._matrix.shape[0]:
            self._matrix = np.concatenate([self._matrix, np.zeros_like(self._matrix)])
            self._sketch = np.concatenate([self._sketch, np.zeros_like(self._sketch)], axis=1)
            self._alive = np.concatenate([self._alive, np.zeros_like(self._alive)])
        self._matrix[row] = vector
        self._sketch[:, row] = sign_sketch(vector[np.newaxis, :])[0]
        self._alive[row] = True
        self._ids.append(entry_id)
        self._texts.append(text)
        self._positions[entry_id] = row

    def drop(self, entry_id: str) -> None:
        row = self._positions.get(entry_id)
        if row is not None:
            self._alive[row] = False

    def search(self, query: np.ndarray, threshold: float, limit: int = CANDIDATES) -> SearchResult:
        """Up to `limit` live candidates at or above `threshold`, best first, and the best similarity seen."""
        rows, scores = self._score(query)
        if scores.size == 0:
            return SearchResult([], None)
        if limit < scores.size:
            top = np.argpartition(-scores, limit)[:limit]
        else:
            top = np.arange(scores.size)
        top = top[np.argsort(-scores[top])]
        best = float(scores[top[0]]) if scores[top[0]] > -1.0 else None
        candidates = [
            Candidate(self._ids[rows[i]], self._texts[rows[i]], float(scores[i]))
            for i in top
            if scores[i] >= threshold and scores[i] > -1.0
        ]
        return SearchResult(candidates, best)

    def _score(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row numbers, cosine) of the rows worth scoring; dropped rows score -1."""
        n = len(self._ids)
        alive = self._alive[:n]
        if n <= EXACT_ROWS:
            scores = self._matrix[:n] @ query
            scores[~alive] = -1.0
            return np.arange(n), scores
        words = np.bitwise_xor(self._sketch[:, :n], sign_sketch(query[np.newaxis, :])[0][:, np.newaxis])
        bits = np.bitwise_count(words)
        distance = bits[0].astype(np.uint16)
        for word_bits in bits[1:]:
            distance += word_bits
        distance[~alive] = np.iinfo(distance.dtype).max
        rows = np.argpartition(distance, SHORTLIST)[:SHORTLIST]
        scores = self._matrix[rows] @ query
        scores[~alive[rows]] = -1.0
        return rows, scores


class SemanticStore:
    """Redis side of L2 plus the worker's per-partition indexes."""

    def __init__(self, redis_client: Any, dim_hint: int = 0) -> None:
        self._redis = redis_client
        self._indexes: OrderedDict[str, PartitionIndex] = OrderedDict()
        self._writes = 0
        self.dim_hint = dim_hint

    @staticmethod
    def _log_key(partition: str) -> str:
        return f"gw:s:{{{partition}}}:log"

    @staticmethod
    def _entry_key(partition: str, entry_id: str) -> str:
        return f"gw:s:{{{partition}}}:e:{entry_id}"

    def index(self, partition: str, dim: int, now: float) -> PartitionIndex:
        """The partition's index, synced with Redis if it is older than SYNC_SECONDS."""
        index = self._indexes.get(partition)
        if index is None or index.dim != dim:
            index = PartitionIndex(dim)
            self._indexes[partition] = index
            self._evict()
        self._indexes.move_to_end(partition)
        if now - index.synced_at >= SYNC_SECONDS:
            self._sync(partition, index, now)
        return index

    def _sync(self, partition: str, index: PartitionIndex, now: float) -> None:
        # Entries written since the last sync, with a margin for clock skew between writers.
        since = max(0.0, index.synced_score - 5000.0)
        ids = self._redis.zrangebyscore(self._log_key(partition), since, "+inf", withscores=True)
        index.synced_at = now
        new = [(_text(member), score) for member, score in ids if _text(member) not in index]
        if ids:
            index.synced_score = max(score for _, score in ids)
        if not new:
            return
        pipe = self._redis.pipeline(transaction=False)
        for entry_id, _ in new:
            pipe.hmget(self._entry_key(partition, entry_id), "v", "q")
        for (entry_id, _), (vector, text) in zip(new, pipe.execute(), strict=True):
            if vector is not None and text is not None:
                index.add(entry_id, decode_vector(vector), _text(text))

    def confirm(self, partition: str, entry_id: str) -> bytes | None:
        """The cached answer if the entry still exists in Redis (not expired, not deleted)."""
        content = self._redis.hget(self._entry_key(partition, entry_id), "a")
        if content is None:
            index = self._indexes.get(partition)
            if index is not None:
                index.drop(entry_id)
        return content

    def put(self, partition: str, entry_id: str, vector: np.ndarray, text: str, content: bytes, ttl: int) -> None:
        now_ms = time.time() * 1000.0
        entry_key = self._entry_key(partition, entry_id)
        log_key = self._log_key(partition)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(entry_key, mapping={"v": encode_vector(vector), "q": text, "a": content})
        pipe.expire(entry_key, ttl)
        pipe.zadd(log_key, {entry_id: now_ms})
        pipe.expire(log_key, max(ttl, 3600) * 2)
        self._writes += 1
        if self._writes % LOG_TRIM_EVERY == 0:
            # Log members older than the longest TTL in use point at expired entries.
            pipe.zremrangebyscore(log_key, "-inf", now_ms - ttl * 1000.0 * 2)
        pipe.execute()
        index = self._indexes.get(partition)
        if index is not None:
            index.add(entry_id, vector, text)

    def stats(self) -> dict[str, int]:
        return {"partitions": len(self._indexes), "rows": sum(len(i) for i in self._indexes.values())}

    def clear(self) -> None:
        self._indexes.clear()

    def _evict(self) -> None:
        rows = sum(len(i) for i in self._indexes.values())
        while rows > MAX_ROWS_PER_WORKER and len(self._indexes) > 1:
            _, oldest = self._indexes.popitem(last=False)
            rows -= len(oldest)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
