"""Run-time client keys in Redis, as SHA-256 digests only; shared by every worker and pod.

Layout (one hash tag, so every write of a key is one MULTI/EXEC, on Redis Cluster too):
- `gw:{gwkeys}:digest:<sha256 hex>`: what a request needs to know about the key (tenant, limits, models,
  expiry) as JSON: the request path's one GET. It expires with the key (PXAT), or at the end of a rotation's
  grace, so Redis itself drops a key that is no longer valid.
- `gw:{gwkeys}:key:<id>`: the admin record (name, metadata, the digests in use, never a secret).
- `gw:{gwkeys}:ids`: sorted set of ids by creation time, for the listing.
- `gw:{gwkeys}:used`: hash id -> last use (unix seconds), written in batches by the workers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import redis

PREFIX = "gw:{gwkeys}:"
DIGEST = PREFIX + "digest:"
RECORD = PREFIX + "key:"
INDEX = PREFIX + "ids"
USED = PREFIX + "used"
# Fields of a record the request path needs, copied onto each of its digests.
ENTRY_FIELDS = ("id", "tenant", "limits", "models", "budget", "expires_at")
WATCH_ATTEMPTS = 5

Record = dict[str, Any]


class KeyConflict(Exception):
    """A record kept changing under a read-modify-write (other admins at work); the caller retries."""


class KeyStore:
    """CRUD of run-time key records and their digests. Raises redis-py's errors when Redis fails."""

    def __init__(self, client: Any) -> None:
        self.redis = client

    def entry(self, digest_hex: str) -> dict[str, Any] | None:
        """The request path's look-up: one GET."""
        raw = self.redis.get(DIGEST + digest_hex)
        return None if raw is None else json.loads(raw)

    def get(self, key_id: str) -> Record | None:
        raw = self.redis.get(RECORD + key_id)
        return None if raw is None else json.loads(raw)

    def records(self) -> list[Record]:
        """Every record, oldest first, with `last_used_at` filled in."""
        ids = [i.decode() for i in self.redis.zrange(INDEX, 0, -1)]
        if not ids:
            return []
        raws = self.redis.mget([RECORD + i for i in ids])
        used = self.redis.hmget(USED, ids)
        out = []
        for raw, last in zip(raws, used, strict=True):
            if raw is None:
                continue  # removed between the two reads
            record = json.loads(raw)
            record["last_used_at"] = None if last is None else float(last)
            out.append(record)
        return out

    def create(self, record: Record, now: float) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(RECORD + record["id"], json.dumps(record))
            pipe.zadd(INDEX, {record["id"]: record["created_at"]})
            _write_digests(pipe, record, (), now)
            pipe.execute()

    def update(self, key_id: str, change: Callable[[Record], Record], now: float) -> Record | None:
        """Apply `change` to the record and rewrite its digests, atomically; None if there is no such key."""

        def write(pipe: Any, before: Record) -> Record:
            after = change(json.loads(json.dumps(before)))
            after["digests"] = [d for d in after["digests"] if _live(d, after, now)]
            pipe.set(RECORD + key_id, json.dumps(after))
            _write_digests(pipe, after, [d["digest"] for d in before["digests"]], now)
            return after

        return self._watched(key_id, write)

    def delete(self, key_id: str) -> Record | None:
        """Remove the key and every digest it had (revocation); None if there was no such key."""

        def write(pipe: Any, record: Record) -> Record:
            pipe.delete(RECORD + key_id, *[DIGEST + d["digest"] for d in record["digests"]])
            pipe.zrem(INDEX, key_id)
            pipe.hdel(USED, key_id)
            return record

        return self._watched(key_id, write)

    def _watched(self, key_id: str, write: Callable[[Any, Record], Record]) -> Record | None:
        """Read the record under WATCH, queue `write`'s commands in MULTI, EXEC; again if another admin got there
        first. None if there is no such key."""
        for _ in range(WATCH_ATTEMPTS):
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(RECORD + key_id)
                    raw = pipe.get(RECORD + key_id)
                    if raw is None:
                        return None
                    pipe.multi()
                    result = write(pipe, json.loads(raw))
                    pipe.execute()
                    return result
                except redis.WatchError:
                    continue
        raise KeyConflict(f"key {key_id} kept changing; retry")

    def note_used(self, last_used: Mapping[str, float]) -> None:
        """Record last-use times (a worker's batch). A revoked key's stray field is ignored by `records`."""
        if last_used:
            self.redis.hset(USED, mapping={k: f"{v:.3f}" for k, v in last_used.items()})


def _deadline(digest: Mapping[str, Any], record: Record) -> float | None:
    """When a digest stops working: the key's expiry or the end of its rotation grace, whichever is first."""
    ends = [t for t in (record.get("expires_at"), digest.get("not_after")) if t is not None]
    return min(ends) if ends else None


def _live(digest: Mapping[str, Any], record: Record, now: float) -> bool:
    deadline = _deadline(digest, record)
    return deadline is None or deadline > now


def _write_digests(pipe: Any, record: Record, previous: Any, now: float) -> None:
    """Each live digest gets the record's current entry and its deadline; digests no longer live are deleted."""
    entry = {name: record.get(name) for name in ENTRY_FIELDS}
    live = set()
    for item in record["digests"]:
        deadline = _deadline(item, record)
        if deadline is not None and deadline <= now:
            continue
        live.add(item["digest"])
        value = json.dumps({**entry, "not_after": item.get("not_after")})
        if deadline is None:
            pipe.set(DIGEST + item["digest"], value)
        else:
            pipe.set(DIGEST + item["digest"], value, pxat=int(deadline * 1000))
    gone = [DIGEST + d for d in previous if d not in live]
    gone += [DIGEST + d["digest"] for d in record["digests"] if d["digest"] not in live]
    if gone:
        pipe.delete(*gone)
