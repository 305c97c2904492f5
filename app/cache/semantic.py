"""L2 storage: entries in Redis, a bounded in-memory index of their static vectors in each worker.

Redis layout, all keys of one partition under one hash tag (one cluster slot):
  gw:s2:{<partition>}:log       ZSET  entry id -> time written (ms); what workers sync from
  gw:s2:{<partition>}:e:<id>    HASH  s = static vector, t = transformer vector (once computed), both float32 LE;
                                      q = the normalised text, x = expiry (unix s), a = the answer JSON
  gw:s2:{<partition>}:warm      STRING set (with a TTL) by a worker that served an L2 hit there: every worker then
                                      computes new entries' transformer vectors in the background
A worker syncs a partition at most every SYNC_SECONDS (one round trip for what is new in the log and the warm mark,
one pipelined HMGET of those rows), searches the static vectors with one matrix-vector product, and reads the
transformer vectors of the few candidates that survive the cheap checks together with their answers, in one round
trip: what is served was in Redis when the look-up ran, and an expired or deleted entry is never served.

Memory is bounded per worker at all times, across partitions: past ``max_rows`` or ``max_bytes`` the oldest rows go
first (not whole partitions), expired rows are skipped by every search and compacted away.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from app.cache.write_behind import Write, WriteBehind

SYNC_SECONDS = 0.5
CANDIDATES = 3  # best static candidates looked at per look-up, best first
SORTED_IN_PYTHON = 16  # rows above the static floor ranked in Python; past that, narrowed by numpy first
#: What one row costs a worker beyond its vector and text: list slots, dict entry, id string, expiry, serial and
#: its place in the eviction order.
ROW_OVERHEAD_BYTES = 160
#: A partition with more than 1/HOT_SHARE of the row bound evicts its own oldest rows when the bound is reached.
HOT_SHARE = 4

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
    static_similarity: float


class PartitionIndex:
    """The static vectors of one partition held by this worker: a growing float32 matrix of unit rows."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._matrix = np.zeros((16, dim), dtype=np.float32)
        self._expires = np.zeros(16, dtype=np.float64)
        self._serials = np.zeros(16, dtype=np.int64)  # the caller's number for each add (its eviction order)
        self._alive = np.zeros(16, dtype=bool)
        self._ids: list[str] = []
        self._texts: list[str] = []
        self._positions: dict[str, int] = {}
        self.live = 0
        self.synced_at = 0.0
        self.synced_score = 0.0
        self.warm = False  # some worker served an L2 hit here lately (the partition's warm mark, as of the sync)

    def __len__(self) -> int:
        return self.live

    def __contains__(self, entry_id: str) -> bool:
        """Whether the id has a live row here (a row dropped when its entry expired or left Redis does not count:
        the same id stored again, as a repeat of an expired prompt is, gets a new row)."""
        return self.is_live(entry_id)

    def add(self, entry_id: str, vector: np.ndarray, text: str, expires_at: float, serial: int = 0) -> bool:
        """Add a row; False when the id has a live row already or the vector has the wrong shape. ``serial``, the
        caller's number for this add, tells this row from an earlier, dropped row of the same id."""
        if self.is_live(entry_id) or vector.shape != (self.dim,):
            return False
        row = len(self._ids)
        if row == self._matrix.shape[0]:
            grow = max(16, row)
            self._matrix = np.concatenate([self._matrix, np.zeros((grow, self.dim), dtype=np.float32)])
            self._expires = np.concatenate([self._expires, np.zeros(grow)])
            self._serials = np.concatenate([self._serials, np.zeros(grow, dtype=np.int64)])
            self._alive = np.concatenate([self._alive, np.zeros(grow, dtype=bool)])
        self._matrix[row] = vector
        self._expires[row] = expires_at
        self._serials[row] = serial
        self._alive[row] = True
        self._ids.append(entry_id)
        self._texts.append(text)
        self._positions[entry_id] = row
        self.live += 1
        return True

    def is_live(self, entry_id: str) -> bool:
        row = self._positions.get(entry_id)
        return row is not None and bool(self._alive[row])

    def serial(self, entry_id: str) -> int | None:
        """The ``serial`` the id's live row was added with; None when the id has no live row."""
        row = self._positions.get(entry_id)
        return int(self._serials[row]) if row is not None and self._alive[row] else None

    def drop(self, entry_id: str) -> str | None:
        """Forget a row (expired, deleted or evicted); its text, for the caller's byte count."""
        row = self._positions.get(entry_id)
        if row is None or not self._alive[row]:
            return None
        self._alive[row] = False
        self.live -= 1
        text = self._texts[row]
        self._texts[row] = ""
        if len(self._ids) >= 64 and self.live < len(self._ids) // 2:
            self._compact()
        return text

    def search(self, query: np.ndarray, floor: float, now: float, limit: int = CANDIDATES) -> list[Candidate]:
        """Up to ``limit`` live, unexpired candidates whose static cosine reaches ``floor``, best first."""
        n = len(self._ids)
        if n == 0 or self.live == 0:
            return []
        # Few numpy calls per search: on the cold caches a new prompt meets, each costs it 10-80 us whatever the
        # size of its arrays. The rows above the floor are ranked in Python when they are few (most searches);
        # only past SORTED_IN_PYTHON are they narrowed first, and dead or expired rows are masked only when one
        # of them took a place among the best. The answer is the same either way.
        scores = self._matrix[:n] @ query
        rows = np.flatnonzero(scores >= floor)
        keep = max(SORTED_IN_PYTHON, limit)
        found = self._usable(scores, _best(scores, rows, keep), now, limit)
        if len(found) < limit and rows.size > keep:  # dead or expired rows took places among the best: mask them
            scores[~(self._alive[:n] & (self._expires[:n] > now))] = -np.inf
            found = self._usable(scores, _best(scores, np.flatnonzero(scores >= floor), keep), now, limit)
        return found

    def _usable(self, scores: np.ndarray, rows: np.ndarray, now: float, limit: int) -> list[Candidate]:
        """The best ``limit`` of ``rows`` that are live and unexpired, best first (ties: the later row first)."""
        alive, expires, found = self._alive, self._expires, []
        for score, row in sorted(zip(scores[rows].tolist(), rows.tolist(), strict=True), reverse=True):
            if alive[row] and expires[row] > now:
                found.append(Candidate(self._ids[row], self._texts[row], score))
                if len(found) == limit:
                    break
        return found

    def oldest(self) -> str | None:
        """The id of the oldest live row (rows are kept in the order they were added)."""
        live = np.flatnonzero(self._alive[: len(self._ids)])
        return self._ids[live[0]] if live.size else None

    def expired(self, now: float) -> list[str]:
        n = len(self._ids)
        rows = np.flatnonzero(self._alive[:n] & (self._expires[:n] <= now))
        return [self._ids[i] for i in rows]

    def _compact(self) -> None:
        keep = np.flatnonzero(self._alive[: len(self._ids)])
        size = max(16, len(keep) * 2)
        matrix = np.zeros((size, self.dim), dtype=np.float32)
        matrix[: len(keep)] = self._matrix[keep]
        expires = np.zeros(size)
        expires[: len(keep)] = self._expires[keep]
        serials = np.zeros(size, dtype=np.int64)
        serials[: len(keep)] = self._serials[keep]
        alive = np.zeros(size, dtype=bool)
        alive[: len(keep)] = True
        self._matrix, self._expires, self._alive, self._serials = matrix, expires, alive, serials
        self._ids = [self._ids[i] for i in keep]
        self._texts = [self._texts[i] for i in keep]
        self._positions = {entry_id: row for row, entry_id in enumerate(self._ids)}


@dataclass(frozen=True)
class IndexBounds:
    max_rows: int
    max_bytes: int


class SemanticStore:
    """Redis side of L2 plus the worker's per-partition indexes, bounded together."""

    def __init__(self, redis_client: Any, bounds: IndexBounds, writes: WriteBehind | None = None) -> None:
        self._redis = redis_client
        self._writes = writes if writes is not None and writes.carries_scripts else None
        # Rows this worker indexed whose write still waits or travels: a look-up that finds one before Redis has it
        # treats it as a miss but does not forget it (a forgotten id is not indexed again by a sync).
        self._unwritten: set[tuple[str, str]] = set()
        self._hset_if_exists = redis_client.register_script(_lua("hset_if_exists.lua"))
        self._put = redis_client.register_script(_lua("l2_put.lua"))
        self.bounds = bounds
        self._indexes: OrderedDict[str, PartitionIndex] = OrderedDict()
        # (partition, entry id, serial), oldest first: the serial tells the row added then from a later row of the
        # same id (a repeat of an expired prompt), which must not be evicted as if it were as old.
        self._order: deque[tuple[str, str, int]] = deque()
        self._added = 0
        self.rows = 0
        self.bytes = 0
        self.evicted = 0

    @staticmethod
    def _log_key(partition: str) -> str:
        return f"gw:s2:{{{partition}}}:log"

    @staticmethod
    def _warm_key(partition: str) -> str:
        return f"gw:s2:{{{partition}}}:warm"

    @staticmethod
    def _entry_key(partition: str, entry_id: str) -> str:
        return f"gw:s2:{{{partition}}}:e:{entry_id}"

    def index(self, partition: str, dim: int, now: float) -> PartitionIndex:
        """The partition's index, synced with Redis if it is older than SYNC_SECONDS."""
        index = self._indexes.get(partition)
        if index is None or index.dim != dim:
            index = PartitionIndex(dim)
            self._indexes[partition] = index
        self._indexes.move_to_end(partition)
        if _sync_due(index, now):
            self._sync(partition, index, now)
        return index

    def fresh_index(self, partition: str, dim: int, now: float) -> PartitionIndex | None:
        """The partition's index as this worker holds it when no sync is due: no I/O, nothing changed (not even
        the order in which partitions are kept). None when there is none or it is due for a sync."""
        index = self._indexes.get(partition)
        if index is None or index.dim != dim or _sync_due(index, now):
            return None
        return index

    def _sync(self, partition: str, index: PartitionIndex, now: float) -> None:
        # Entries logged since the newest one seen (inclusive: several may share a millisecond). Scores are the
        # Redis server's clock (l2_put.lua), so no margin for skew between writers is needed.
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrangebyscore(self._log_key(partition), index.synced_score, "+inf", withscores=True)
        pipe.exists(self._warm_key(partition))
        ids, warm = pipe.execute()
        index.synced_at = now
        index.warm = bool(warm)
        for entry_id in index.expired(now):
            self._forget(index, entry_id)
        new = [(_text(member), score) for member, score in ids if _text(member) not in index]
        if ids:
            index.synced_score = max(score for _, score in ids)
        if not new:
            return
        pipe = self._redis.pipeline(transaction=False)
        for entry_id, _ in new:
            pipe.hmget(self._entry_key(partition, entry_id), "s", "q", "x")
        for (entry_id, _), (vector, text, expires) in zip(new, pipe.execute(), strict=True):
            if vector is not None and text is not None and expires is not None:
                self._add(partition, index, entry_id, decode_vector(vector), _text(text), float(expires))

    def is_warm(self, partition: str) -> bool:
        """Whether some worker marked the partition warm (as of this worker's last sync of it)."""
        index = self._indexes.get(partition)
        return index is not None and index.warm

    def mark_warm(self, partition: str, seconds: int) -> None:
        """Tell every worker, at its next sync, that L2 pays here: for ``seconds``, new entries get both vectors."""
        self._redis.set(self._warm_key(partition), 1, ex=seconds)

    def candidates(self, partition: str, entry_ids: list[str]) -> list[tuple[np.ndarray | None, bytes | None]]:
        """For each entry, its transformer vector (None until computed) and its answer (None: the entry expired or
        was deleted, and leaves this worker's index), in one round trip: a served answer is read with the vector
        that admitted it, so an entry gone from Redis is never served."""
        pipe = self._redis.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.hmget(self._entry_key(partition, entry_id), "t", "a")
        found: list[tuple[np.ndarray | None, bytes | None]] = []
        for entry_id, (vector, content) in zip(entry_ids, pipe.execute(), strict=True):
            if content is None and (partition, entry_id) not in self._unwritten:
                index = self._indexes.get(partition)
                if index is not None:
                    self._forget(index, entry_id)
            found.append((decode_vector(vector) if vector else None, content))
        return found

    def put(self, partition: str, entry_id: str, static: np.ndarray, transformer: np.ndarray | None, text: str,
            content: bytes, ttl: int, on_error: Callable[[Exception], None]) -> None:
        """Write the entry and log it (one EVALSHA); this worker's index has it at once, others at their sync.

        In a gevent worker the EVALSHA waits in the `WriteBehind` for the next look-up's round trip (or its flush,
        milliseconds later), so the index holds the row before Redis does: a look-up that reads its answer meanwhile
        finds none and counts a miss, but keeps the row (`_unwritten`). A write that fails leaves a row whose answer
        a later look-up does not find: it is dropped then, as an entry deleted in Redis is. Errors go to `on_error`
        (raised when written at once).
        """
        fields: list[Any] = ["s", encode_vector(static), "q", text, "a", content]
        if transformer is not None:
            fields += ["t", encode_vector(transformer)]
        keys, args = [self._entry_key(partition, entry_id), self._log_key(partition)], [entry_id, ttl, *fields]
        if self._writes is not None and self._writes.waits():
            unwritten = (partition, entry_id)
            write = Write(("EVALSHA", self._put.sha, len(keys), *keys, *args), on_error,
                          size=sum(len(value) for value in fields if isinstance(value, bytes | str)),
                          script=self._put, on_settled=lambda: self._unwritten.discard(unwritten))
            if not self._writes.add(write):
                return
            self._unwritten.add(unwritten)
            expires_at = time.time() + ttl
        else:
            expires_at = int(self._put(keys=keys, args=args)) / 1000.0 + ttl
        index = self._indexes.get(partition)
        if index is not None:
            self._add(partition, index, entry_id, static, text, expires_at)

    def remember_transformer_vectors(self, partition: str, vectors: dict[str, np.ndarray]) -> None:
        """Keep transformer vectors computed for candidates, so the next look-up does not compute them again.

        One script call per entry (a few, in the background): Redis Cluster pipelines refuse EVALSHA.
        """
        for entry_id, vector in vectors.items():
            # Only on an entry that still exists: HSET on a missing key would create one without expiry.
            self._hset_if_exists(keys=[self._entry_key(partition, entry_id)], args=["t", encode_vector(vector)])

    def stats(self) -> dict[str, int]:
        return {"partitions": len(self._indexes), "rows": self.rows, "bytes": self.bytes,
                "max_rows": self.bounds.max_rows, "max_bytes": self.bounds.max_bytes, "evicted": self.evicted}

    def clear(self) -> None:
        self._indexes.clear()
        self._order.clear()
        self.rows = self.bytes = 0

    # -- bounds -------------------------------------------------------------------------------------------------

    def _row_bytes(self, dim: int, text: str) -> int:
        return dim * 4 + len(text) + ROW_OVERHEAD_BYTES

    def _add(self, partition: str, index: PartitionIndex, entry_id: str, vector: np.ndarray, text: str,
             expires_at: float) -> None:
        self._added += 1
        if not index.add(entry_id, vector, text, expires_at, self._added):
            return
        self.rows += 1
        self.bytes += self._row_bytes(index.dim, text)
        self._order.append((partition, entry_id, self._added))
        while self.rows > self.bounds.max_rows or self.bytes > self.bounds.max_bytes:
            # A partition holding more than its share pays for its own growth with its oldest rows; otherwise the
            # oldest rows of the worker go. Either way the other partitions keep theirs.
            if index.live > self.bounds.max_rows // HOT_SHARE or index.live * 4 > self.rows * 3:
                victim = index.oldest()
                if victim is not None and self._forget(index, victim):
                    self.evicted += 1
                    continue
            if not self._order:
                break
            old_partition, old_id, serial = self._order.popleft()
            old_index = self._indexes.get(old_partition)
            if old_index is not None and old_index.serial(old_id) == serial and self._forget(old_index, old_id):
                self.evicted += 1
        if len(self._order) > 2 * max(self.rows, 1024):  # ids of rows already forgotten another way
            self._order = deque(item for item in self._order if self._live(*item))

    def _forget(self, index: PartitionIndex, entry_id: str) -> bool:
        text = index.drop(entry_id)
        if text is None:
            return False
        self.rows -= 1
        self.bytes -= self._row_bytes(index.dim, text)
        return True

    def _live(self, partition: str, entry_id: str, serial: int) -> bool:
        index = self._indexes.get(partition)
        return index is not None and index.serial(entry_id) == serial


def _best(scores: np.ndarray, rows: np.ndarray, keep: int) -> np.ndarray:
    """The ``keep`` of ``rows`` with the highest scores, in no order (all of them when they are no more)."""
    if rows.size <= keep:
        return rows
    return rows[np.argpartition(scores[rows], rows.size - keep)[-keep:]]


def _sync_due(index: PartitionIndex, now: float) -> bool:
    return now - index.synced_at >= SYNC_SECONDS


def _lua(name: str) -> str:
    return resources.files(__package__).joinpath("lua", name).read_text(encoding="utf-8")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
