"""Client keys -> tenants. Keys are held only as SHA-256 digests and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from app.config import ConfigError, read_yaml_file
from app.errors import Forbidden, Unauthorized
from app.spend.budget import Budget, parse_budget
from app.upstream.fallbacks import FallbackRule, parse_rules

DEV_TENANT = "default"


@dataclass(frozen=True)
class TenantLimits:
    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0

    @property
    def any(self) -> bool:
        return bool(self.rpm or self.tpm or self.concurrency)


@dataclass(frozen=True)
class Tenant:
    name: str
    limits: TenantLimits = TenantLimits()
    models: frozenset[str] | None = None  # None: every model
    model_limits: Mapping[str, TenantLimits] = field(default_factory=dict)
    fallbacks: Mapping[str, FallbackRule] = field(default_factory=dict)  # over UPSTREAMS_FILE's, model by model
    budget: Budget | None = None  # USD per UTC day / month (app/spend/budget.py)

    def check_model(self, model: str) -> None:
        if self.models is not None and model not in self.models:
            raise Forbidden(f"The key's tenant may not use the model `{model}`.")


class AuthConfigError(ConfigError):
    """The client keys configuration is unusable; the message says where."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class RuntimeKeys(Protocol):
    """Keys issued at run time (app/keys/): asked only about keys of their own shape, after the static ones."""

    def claims(self, key: str) -> bool: ...

    def authenticate(self, key_digest: bytes, budget: Any) -> Tenant: ...


class Authenticator:
    """Looks a bearer key up by digest: the static keys first (in memory), then the run-time keys, if any.

    With auth disabled every request is the dev tenant. `sources`: where each static digest came from
    (`env` or `file`), for the admin listing.
    """

    def __init__(self, tenants: Mapping[bytes, Tenant], *, disabled: bool, default_limits: TenantLimits,
                 sources: Mapping[bytes, str] | None = None) -> None:
        self._tenants = dict(tenants)
        self.sources = dict(sources or {})
        self.disabled = disabled
        self.default_limits = default_limits
        self._anonymous = Tenant(name=DEV_TENANT, limits=default_limits)
        self.runtime: RuntimeKeys | None = None

    @property
    def tenants(self) -> list[Tenant]:
        """Every tenant a request can become (the anonymous one too, with auth disabled)."""
        known = {t.name: t for t in self._tenants.values()}
        if self.disabled:
            known[self._anonymous.name] = self._anonymous
        return list(known.values())

    def static_keys(self) -> list[tuple[bytes, Tenant, str]]:
        """Each key from the environment or the keys file: (digest, tenant, source)."""
        return [(d, t, self.sources.get(d, "env")) for d, t in self._tenants.items()]

    def authenticate(self, authorization: str | None, budget: Any = None) -> Tenant:
        """The key's tenant; `budget` is the request's Redis time, for a run-time key's one look-up."""
        if self.disabled:
            return self._anonymous
        # The scheme is case-insensitive (RFC 9110): `bearer ...` is as good as `Bearer ...`.
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        key = token.strip()
        presented = digest(key)
        match: Tenant | None = None
        for known, tenant in self._tenants.items():  # every digest compared: no early exit to time
            if hmac.compare_digest(known, presented):
                match = tenant
        if match is None:
            if self.runtime is not None and self.runtime.claims(key):
                return self.runtime.authenticate(presented, budget)
            raise Unauthorized("Incorrect API key provided.")
        return match


def build_authenticator(
    keys: tuple[str, ...], keys_file: str | None, *, disabled: bool, default_limits: TenantLimits,
    runtime_keys: bool = False,
) -> Authenticator:
    """From GATEWAY_API_KEYS (`key` or `tenant:key`) and GATEWAY_KEYS_FILE; refuse to run open by accident.

    `runtime_keys`: keys can be issued through the admin API, so a gateway without static keys is not open.
    """
    tenants: dict[bytes, Tenant] = {}
    for entry in keys:
        name, sep, key = entry.partition(":")
        if not sep:
            name, key = "", entry
        if not key.strip():
            # An empty key would match `Authorization: Bearer ` (nothing after the scheme).
            raise AuthConfigError(f"GATEWAY_API_KEYS: the entry for tenant {name!r} has an empty key")
        key_digest = digest(key)
        tenants[key_digest] = Tenant(name=name or "key-" + key_digest.hex()[:8], limits=default_limits)
    sources = dict.fromkeys(tenants, "env")
    if keys_file:
        from_file = load_keys_file(Path(keys_file), default_limits)
        tenants.update(from_file)
        sources.update(dict.fromkeys(from_file, "file"))
    if not tenants and not disabled and not runtime_keys:
        raise AuthConfigError(
            "no client keys configured: set GATEWAY_API_KEYS or GATEWAY_KEYS_FILE, or ADMIN_API_KEY to issue "
            "keys through the admin API, or AUTH_DISABLED=true to run without authentication (development only)"
        )
    return Authenticator(tenants, disabled=disabled, default_limits=default_limits, sources=sources)


def load_keys_file(path: Path, default_limits: TenantLimits) -> dict[bytes, Tenant]:
    """YAML: `tenants: [{name, keys | key_sha256, limits: {rpm, tpm, concurrency}, models, model_limits,
    fallbacks, budget: {usd_per_day, usd_per_month}}]`."""
    doc = read_yaml_file(path, "GATEWAY_KEYS_FILE", AuthConfigError)
    items = doc.get("tenants") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise AuthConfigError(f"GATEWAY_KEYS_FILE {path}: expected a 'tenants' list")
    tenants: dict[bytes, Tenant] = {}
    for index, item in enumerate(items):
        where = f"GATEWAY_KEYS_FILE {path}: tenants[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise AuthConfigError(f"{where}: needs a 'name'")
        tenant = Tenant(
            name=item["name"],
            limits=_limits(item.get("limits"), default_limits, where),
            models=frozenset(map(str, item["models"])) if item.get("models") else None,
            model_limits={
                str(model): _limits(value, TenantLimits(), f"{where}.model_limits.{model}")
                for model, value in (item.get("model_limits") or {}).items()
            },
            fallbacks=parse_rules(item.get("fallbacks"), f"{where}.fallbacks"),
            budget=_budget(item.get("budget"), where),
        )
        plain = [str(k) for k in item.get("keys") or []]
        if any(not k.strip() for k in plain):
            raise AuthConfigError(f"{where}: a key is empty")
        digests = [digest(k) for k in plain]
        digests += [_sha256_hex(h, where) for h in item.get("key_sha256") or []]
        if not digests:
            raise AuthConfigError(f"{where}: needs 'keys' or 'key_sha256'")
        for key_digest in digests:
            tenants[key_digest] = tenant
    return tenants


def _budget(value: Any, where: str) -> Budget | None:
    try:
        return parse_budget(value)
    except ValueError as exc:
        raise AuthConfigError(f"{where}: {exc}") from None


def _sha256_hex(value: Any, where: str) -> bytes:
    """A `key_sha256` entry: 64 hex digits, or the key could never match."""
    try:
        raw = bytes.fromhex(str(value))
    except ValueError:
        raw = b""
    if len(raw) != hashlib.sha256().digest_size:
        raise AuthConfigError(f"{where}: each key_sha256 is 64 hex digits (a SHA-256 of the key)")
    return raw


def _limits(value: Any, default: TenantLimits, where: str) -> TenantLimits:
    if value is None:
        return default
    if not isinstance(value, dict) or not all(isinstance(value.get(k, 0), int) for k in ("rpm", "tpm", "concurrency")):
        raise AuthConfigError(f"{where}: limits are integers rpm, tpm, concurrency")
    return TenantLimits(
        rpm=value.get("rpm", default.rpm), tpm=value.get("tpm", default.tpm),
        concurrency=value.get("concurrency", default.concurrency),
    )
