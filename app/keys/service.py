"""Run-time client keys: the request path's look-up and the admin operations on them.

The request path: a key of the run-time shape (`sk-gwr-...`) that matched no static key is looked up by its
SHA-256 digest, one GET, remembered by the worker for at most CACHE_SECONDS, so a created key works and a revoked
or expired one is refused in every worker within a second. When Redis cannot be asked (the shared breaker is
open, the request's Redis budget is spent, the call fails) a run-time key is refused with a 503: fail closed,
since a revoked key must never get in. Static keys never reach this module.

Secrets are shown once, in the answer to a create or a rotate; Redis holds only their digests.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.auth import Authenticator, Tenant, TenantLimits, digest
from app.breaker import Breaker
from app.concurrency import gevent_patched, sleep, spawn
from app.errors import BadRequest, GatewayError, NotFound, ServiceUnavailable, Unauthorized, invalid_value
from app.keys.store import KeyConflict, KeyStore, Record
from app.observability import metrics
from app.redis_client import REDIS_FAILURES, RedisBudget, bounded, opens_breaker
from app.spend.budget import parse_budget

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-gwr-"
SHOWN_PREFIX_CHARS = len(KEY_PREFIX) + 4  # what listings show of a key: enough to tell keys apart
STATIC_ID_PREFIX = "static-"
# A worker trusts what it read about a key this long: the bound on how late a revocation takes effect.
CACHE_SECONDS = 0.5
CACHE_MAX_ENTRIES = 10_000
LAST_USED_FLUSH_SECONDS = 5.0
MAX_GRACE_SECONDS = 30 * 86400
MAX_METADATA_BYTES = 4096
MAX_NAME_CHARS = 256
# Tenant names end up in Redis key names (`gw:{tenant}:rpm`): no braces, no spaces.
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LIMIT_NAMES = ("rpm", "tpm", "concurrency")
CREATE_FIELDS = frozenset({"tenant", "name", "limits", "models", "expires_at", "metadata", "budget"})
PATCH_FIELDS = frozenset({"name", "limits", "models", "expires_at", "metadata", "budget"})


class KeyReadOnly(GatewayError):
    """A key from GATEWAY_API_KEYS or GATEWAY_KEYS_FILE: the API lists it but cannot change it."""

    status = 409
    error_type = "invalid_request_error"
    code = "key_read_only"


class KeyBusy(GatewayError):
    status = 409
    error_type = "invalid_request_error"
    code = "key_conflict"


def key_store_unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "Run-time API keys cannot be checked right now (the key store, Redis, is unavailable); retry shortly. "
        "Keys from the gateway's configuration are not affected.",
        code="key_store_unavailable", headers={"Retry-After": "1"},
    )


@dataclass(frozen=True, slots=True)
class _Entry:
    """What a worker remembers about one run-time key."""

    key_id: str
    tenant: Tenant
    deadline: float | None  # unix seconds after which the secret no longer works


class KeyService:
    """The run-time keys of the gateway: `claims` + `authenticate` for the Authenticator, the rest for the admin API.

    ``background``: flush last-use times from a greenlet (None: whenever gevent runs, as in the gunicorn worker).
    """

    def __init__(self, store: KeyStore, auth: Authenticator, breaker: Breaker, *,
                 background: bool | None = None) -> None:
        self.store = store
        self.auth = auth
        self.breaker = breaker
        self.background = gevent_patched() if background is None else background
        self._cache: dict[str, tuple[float, _Entry | None]] = {}
        self._used: dict[str, float] = {}
        self._flusher: Any = None

    # -- the request path ---------------------------------------------------------------------------------------

    def claims(self, key: str) -> bool:
        return key.startswith(KEY_PREFIX)

    def authenticate(self, key_digest: bytes, budget: RedisBudget | None) -> Tenant:
        """The tenant of a run-time key; 401 for an unknown, revoked or expired one; 503 if Redis cannot say."""
        digest_hex = key_digest.hex()
        now = time.monotonic()
        cached = self._cache.get(digest_hex)
        if cached is None or cached[0] <= now:
            if len(self._cache) >= CACHE_MAX_ENTRIES:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                if len(self._cache) >= CACHE_MAX_ENTRIES:  # a flood of distinct keys: start over
                    self._cache.clear()
            cached = self._cache[digest_hex] = (now + CACHE_SECONDS, self._fetch(digest_hex, budget))
        entry = cached[1]
        wall = time.time()
        if entry is None or (entry.deadline is not None and wall >= entry.deadline):
            raise Unauthorized("Incorrect API key provided.")
        self._note_used(entry.key_id, wall)
        return entry.tenant

    def _fetch(self, digest_hex: str, budget: RedisBudget | None) -> _Entry | None:
        started = time.time()
        if (budget is not None and budget.spent) or not self.breaker.available(started):
            metrics.REDIS_ERRORS.labels("keys").inc()
            raise key_store_unavailable()
        try:
            with bounded(budget):
                raw = self.store.entry(digest_hex)
        except REDIS_FAILURES as exc:
            metrics.REDIS_ERRORS.labels("keys").inc()
            if opens_breaker(exc):
                self.breaker.failed(time.time())
            log.warning("run-time key not checked, Redis unavailable: %s", type(exc).__name__)
            raise key_store_unavailable() from None
        self.breaker.succeeded(started)
        if raw is None:
            return None
        deadlines = [t for t in (raw.get("expires_at"), raw.get("not_after")) if t is not None]
        return _Entry(key_id=raw["id"], tenant=self._tenant(raw), deadline=min(deadlines) if deadlines else None)

    def _tenant(self, raw: Mapping[str, Any]) -> Tenant:
        default = self.auth.default_limits
        limits = raw.get("limits")
        if limits is not None:
            limits = TenantLimits(**{n: limits.get(n, getattr(default, n)) for n in LIMIT_NAMES})
        models = raw.get("models")
        return Tenant(name=raw["tenant"], limits=limits or default,
                      models=frozenset(models) if models is not None else None,
                      budget=parse_budget(raw.get("budget")))

    def _note_used(self, key_id: str, now: float) -> None:
        self._used[key_id] = now
        if self.background and self._flusher is None:
            self._flusher = spawn(self._flush_used)

    def _flush_used(self) -> None:
        """Write the last-use times every few seconds, off the request path, while the breaker lets it."""
        while True:
            sleep(LAST_USED_FLUSH_SECONDS)
            if not self._used:
                continue
            started = time.time()
            if not self.breaker.available(started):
                continue
            batch, self._used = self._used, {}
            try:
                self.store.note_used(batch)
            except REDIS_FAILURES as exc:
                self.breaker.failed(time.time())
                self._used = {**batch, **self._used}
                log.warning("last-use times of keys not written: %s", type(exc).__name__)
                continue
            self.breaker.succeeded(started)

    # -- the admin operations -----------------------------------------------------------------------------------

    def create(self, body: Any) -> tuple[dict[str, Any], str]:
        """A new key from a POST body: (its public view, the secret, to be shown this once)."""
        fields = _object(body, CREATE_FIELDS)
        tenant = fields.get("tenant")
        if not isinstance(tenant, str) or not TENANT_PATTERN.match(tenant):
            raise invalid_value("tenant", "`tenant` is required: 1-64 letters, digits, `.`, `_` or `-`.")
        now = time.time()
        secret = _new_secret()
        record: Record = {
            "id": "key_" + secrets.token_hex(8), "prefix": secret[:SHOWN_PREFIX_CHARS], "tenant": tenant,
            "name": None, "limits": None, "models": None, "budget": None, "created_at": round(now, 3),
            "expires_at": None,
            "metadata": {}, "digests": [{"digest": digest(secret).hex(), "not_after": None}],
        }
        record.update(_changes(fields, now))
        self.store.create(record, now)
        return public(record), secret

    def list(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Static keys (read-only) first, then run-time keys; no secrets, no digests."""
        out = [self._static_view(d, t, source) for d, t, source in self.auth.static_keys()]
        out += [public(record) for record in self.store.records()]
        return [view for view in out if tenant is None or view["tenant"] == tenant]

    def update(self, key_id: str, body: Any) -> dict[str, Any]:
        fields = _object(body, PATCH_FIELDS | {"tenant"})
        if "tenant" in fields:
            raise invalid_value("tenant", "A key's tenant cannot change: create a key for the other tenant.")
        changes = _changes(fields, time.time())
        return public(self._change(key_id, lambda record: {**record, **changes}))

    def revoke(self, key_id: str) -> dict[str, Any]:
        self._writable(key_id)
        record = self.store.delete(key_id)
        if record is None:
            raise _unknown(key_id)
        return {**public(record), "revoked": True}

    def rotate(self, key_id: str, body: Any) -> tuple[dict[str, Any], str]:
        """A new secret; the current one keeps working for `grace_seconds` (default 0: stops at once)."""
        fields = _object(body, frozenset({"grace_seconds"}))
        grace = fields.get("grace_seconds", 0)
        if not _is_int(grace) or not 0 <= grace <= MAX_GRACE_SECONDS:
            raise invalid_value("grace_seconds", f"`grace_seconds` is an integer from 0 to {MAX_GRACE_SECONDS}.")
        now = time.time()
        secret = _new_secret()

        def rotated(record: Record) -> Record:
            old = []
            for item in record["digests"]:
                if item.get("not_after") is None:
                    if grace == 0:
                        continue
                    item = {**item, "not_after": round(now + grace, 3)}
                old.append(item)
            return {**record, "prefix": secret[:SHOWN_PREFIX_CHARS],
                    "digests": [*old, {"digest": digest(secret).hex(), "not_after": None}]}

        return public(self._change(key_id, rotated)), secret

    def _change(self, key_id: str, change: Any) -> Record:
        self._writable(key_id)
        try:
            record = self.store.update(key_id, change, time.time())
        except KeyConflict:
            raise KeyBusy(f"The key {key_id} is being changed by another request; retry.") from None
        if record is None:
            raise _unknown(key_id)
        return record

    def _writable(self, key_id: str) -> None:
        for key_digest, _, source in self.auth.static_keys():
            if key_id == _static_id(key_digest):
                where = "GATEWAY_KEYS_FILE" if source == "file" else "GATEWAY_API_KEYS"
                raise KeyReadOnly(f"The key {key_id} comes from {where} and is read-only: change it there and "
                                  "restart, or issue a run-time key with POST /admin/keys.")

    def _static_view(self, key_digest: bytes, tenant: Tenant, source: str) -> dict[str, Any]:
        limits = tenant.limits
        return {
            "id": _static_id(key_digest), "object": "gateway.key", "prefix": None, "tenant": tenant.name,
            "name": None, "limits": {n: getattr(limits, n) for n in LIMIT_NAMES},
            "models": sorted(tenant.models) if tenant.models is not None else None,
            "budget": tenant.budget.view() if tenant.budget is not None else None, "created_at": None,
            "last_used_at": None, "expires_at": None, "metadata": {}, "source": source,
        }


def public(record: Record) -> dict[str, Any]:
    """The admin view of a run-time key: everything but its digests."""
    rotating = [d["not_after"] for d in record["digests"] if d.get("not_after") is not None]
    return {
        "id": record["id"], "object": "gateway.key", "prefix": record["prefix"], "tenant": record["tenant"],
        "name": record["name"], "limits": record["limits"], "models": record["models"],
        "budget": record.get("budget"), "created_at": record["created_at"], "last_used_at": record.get("last_used_at"),
        "expires_at": record["expires_at"], "metadata": record["metadata"], "source": "api",
        "previous_key_expires_at": max(rotating) if rotating else None,
    }


def _static_id(key_digest: bytes) -> str:
    return STATIC_ID_PREFIX + key_digest.hex()[:16]


def _new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _object(body: Any, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_body")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid_value(unknown[0],
                            f"Unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}.")
    return body


def _changes(fields: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The checked values of the settable fields present in a create or patch body."""
    out: dict[str, Any] = {}
    if "name" in fields:
        name = fields["name"]
        if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME_CHARS):
            raise invalid_value("name", f"`name` is a string of at most {MAX_NAME_CHARS} characters, or null.")
        out["name"] = name
    if "limits" in fields:
        out["limits"] = _limits(fields["limits"])
    if "models" in fields:
        models = fields["models"]
        if models is not None and (not isinstance(models, list) or not models
                                   or not all(isinstance(m, str) and m for m in models)):
            raise invalid_value("models", "`models` is a non-empty list of model names, or null for every model.")
        out["models"] = sorted(set(models)) if models is not None else None
    if "budget" in fields:
        try:
            budget = parse_budget(fields["budget"])
        except ValueError as exc:
            raise invalid_value("budget", f"{exc}: the tenant's spend per UTC day and month, capped for requests "
                                          "with this key.") from None
        out["budget"] = budget.view() if budget is not None else None
    if "expires_at" in fields:
        expires = fields["expires_at"]
        if expires is not None and (not isinstance(expires, int | float) or isinstance(expires, bool)
                                    or not now < expires < 1e11):
            raise invalid_value("expires_at", "`expires_at` is a time in the future, in unix seconds, or null "
                                              "(to revoke a key now, DELETE it).")
        out["expires_at"] = expires
    if "metadata" in fields:
        metadata = fields["metadata"]
        if not isinstance(metadata, dict) or len(json.dumps(metadata)) > MAX_METADATA_BYTES:
            raise invalid_value("metadata", f"`metadata` is a JSON object of at most {MAX_METADATA_BYTES} bytes.")
        out["metadata"] = metadata
    return out


def _limits(value: Any) -> dict[str, int] | None:
    if value is None:
        return None
    if (not isinstance(value, dict) or set(value) - set(LIMIT_NAMES)
            or not all(_is_int(v) and v >= 0 for v in value.values())):
        raise invalid_value("limits", "`limits` is an object of non-negative integers rpm, tpm, concurrency "
                                      "(0 = no limit), or null for the gateway's defaults.")
    return dict(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unknown(key_id: str) -> NotFound:
    return NotFound(f"No run-time key with id {key_id}.", code="key_not_found")
