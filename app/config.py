"""Typed settings, read once from the environment (and `.env`) and validated at start.

Every variable the gateway reads is declared here, once. `Settings.from_env()` parses all of them and
raises one `ConfigError` that names every bad variable, so an operator fixes a deployment in one go.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

class ConfigError(ValueError):
    """Raised when one or more settings are invalid; the message names each variable."""


def read_yaml_file(path: Path, variable: str, error: type[ConfigError] = ConfigError) -> Any:
    """Load a YAML file a setting names; errors say where, never quoting the file (a line may hold a key)."""
    import yaml  # only the optional files need it

    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise error(f"{variable} {path}: {exc.strerror or type(exc).__name__}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise error(f"{variable} {path}: {problem}{where}") from None


@dataclass(frozen=True)
class Settings:
    """The gateway's whole configuration. Build it with `Settings.from_env()`; tests pass their own."""

    port: int = 8080
    web_concurrency: int = 2
    worker_connections: int = 1000
    graceful_timeout: int = 120

    target_url: str = "https://api.deepseek.com"
    upstream_api_keys: tuple[str, ...] = ()
    upstreams_file: str | None = None
    upstream_max_retries: int = 3
    upstream_backoff_factor: float = 0.5
    upstream_backoff_max: float = 8.0
    upstream_retry_after_max: float = 10.0
    upstream_connect_timeout: float = 5.0
    upstream_read_timeout: float = 120.0
    max_body_bytes: int = 10 * 1024 * 1024
    request_header_timeout: float = 10.0
    request_body_timeout: float = 60.0
    request_idle_timeout: float = 10.0
    tenant_max_pending_bodies: int = 64
    max_response_bytes: int = 32 * 1024 * 1024
    cache_max_entry_bytes: int = 2 * 1024 * 1024
    metrics_port: int = 9090

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    redis_max_connections: int = 200
    redis_socket_timeout: float = 0.5
    redis_request_budget: float = 0.5

    gateway_api_keys: tuple[str, ...] = ()
    gateway_keys_file: str | None = None
    auth_disabled: bool = False
    admin_api_key: str | None = None

    rate_limit_rpm: int = 0
    rate_limit_tpm: int = 0
    rate_limit_concurrency: int = 0
    rate_limit_fail_closed: bool = False
    rate_limit_window_seconds: float = 60.0
    rate_limit_burst: float = 0.1

    embedding_provider: str = "local"
    embedding_url: str | None = None
    embedding_api_key: str | None = None
    embedding_model: str | None = None

    cache_enabled: bool = True
    semantic_cache_enabled: bool = True
    # None: the default measured with the verifier it goes with (app/cache/data/verifier.json, see README).
    semantic_cache_threshold: float | None = None
    semantic_max_temperature: float = 0.7
    semantic_index_max_rows: int = 100_000
    semantic_index_max_bytes: int = 64 * 1024 * 1024
    semantic_store_queue_size: int = 1000
    cache_ttl_seconds: int = 86400
    local_cache_size: int = 1024
    local_cache_max_bytes: int = 64 * 1024 * 1024

    trusted_proxies: tuple[str, ...] = ()
    prometheus_multiproc_dir: str | None = None
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, dotenv: bool = True) -> Settings:
        """Read every setting; `.env` in the working directory fills what the environment leaves unset."""
        if environ is None:
            return _parse(process_environ() if dotenv else dict(os.environ))
        return _parse(dict(environ))

    @property
    def upstream_pool_size(self) -> int:
        """Connections kept per upstream host: one per possible in-flight request, bounded."""
        return max(10, min(self.worker_connections, 1000))


def exit_if_invalid() -> None:
    """Stop the process with one message naming every bad setting (gunicorn.conf.py and `make run` call this
    before anything starts)."""
    try:
        Settings.from_env()
    except ConfigError as exc:
        raise SystemExit(f"G-AIGateway cannot start: {exc}") from None


def process_environ() -> dict[str, str]:
    """The environment the settings come from: `.env` in the working directory under the real environment.

    gunicorn.conf.py reads its own few settings (PORT, WEB_CONCURRENCY, ...) from here too, so a value in
    `.env` means the same to gunicorn and to the app.
    """
    return {**_read_dotenv(Path.cwd() / ".env"), **os.environ}


def _read_dotenv(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    from dotenv import dotenv_values  # only needed when a .env exists

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


class _Reader:
    """Collects parse errors so that one ConfigError can name every bad variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.errors: list[str] = []

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None  # an empty value means unset
        return value.strip()

    def get(
        self, name: str, parse: Callable[[str], T], default: T, check: Callable[[T], str | None] | None = None
    ) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            parsed = parse(value)
        except ValueError as exc:
            self.errors.append(f"{name}={_shown(name, value)!s}: {exc}")
            return default
        problem = check(parsed) if check else None
        if problem:
            self.errors.append(f"{name}={_shown(name, value)!s}: {problem}")
            return default
        return parsed


_SECRET_NAMES = ("KEY", "KEYS", "SECRET", "PASSWORD")
# scheme://user:password@host -> scheme://<hidden>@host (REDIS_URL, TARGET_URL may carry credentials).
# Greedy to the last "@": a password may hold "/" or "@" itself; masking a little too much is harmless.
_URL_CREDENTIALS = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://).*@")


def _shown(name: str, value: str) -> str:
    """Never echo a secret back in an error message: not a key, nor the password inside a URL."""
    if any(part in name for part in _SECRET_NAMES):
        return "<hidden>"
    return repr(_URL_CREDENTIALS.sub(r"\1<hidden>@", value))


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError("expected an integer") from None


def _float(value: str) -> float:
    try:
        parsed = float(value)
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(parsed):
        raise ValueError("expected a finite number")
    return parsed


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _at_least(low: float) -> Callable[[float], str | None]:
    return lambda v: None if v >= low else f"must be at least {low:g}"


def _between(low: float, high: float) -> Callable[[float], str | None]:
    return lambda v: None if low <= v <= high else f"must be between {low:g} and {high:g}"


def http_base_url(value: str) -> str:
    """An http(s) URL with a host that request paths are appended to (so no query or fragment), without its
    trailing slash. TARGET_URL, EMBEDDING_URL and every UPSTREAMS_FILE backend `url` are checked here.

    The ValueError says what is wrong without quoting the value: a URL may carry credentials.
    """
    text = value.strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a port out of range or not a number
    except ValueError:
        raise ValueError("expected a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError("expected no query or fragment (the request path is appended)")
    return text.rstrip("/")


def _redis_url(value: str) -> str:
    if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return value


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value.lower()

    return parse


def _networks(value: str) -> tuple[str, ...]:
    entries = _csv(value)
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"{entry!r} is not an address or CIDR") from None
    return entries


def _existing_file(value: str) -> str:
    if not Path(value).is_file():
        raise ValueError("file not found")
    return value


def _parse(env: Mapping[str, str]) -> Settings:
    r = _Reader(env)
    d = Settings()
    positive, non_negative = _at_least(1), _at_least(0)
    upstream_keys = r.get("UPSTREAM_API_KEYS", _csv, ())
    seed_key = r.raw("DEEPSEEK_API_KEY")
    if seed_key and seed_key not in upstream_keys:
        upstream_keys = (*upstream_keys, seed_key)
    values: dict[str, Any] = dict(
        port=r.get("PORT", _int, d.port, _between(1, 65535)),
        web_concurrency=r.get("WEB_CONCURRENCY", _int, d.web_concurrency, positive),
        worker_connections=r.get("WORKER_CONNECTIONS", _int, d.worker_connections, positive),
        graceful_timeout=r.get("GRACEFUL_TIMEOUT", _int, d.graceful_timeout, non_negative),
        target_url=r.get("TARGET_URL", http_base_url, d.target_url),
        upstream_api_keys=upstream_keys,
        upstreams_file=r.get("UPSTREAMS_FILE", _existing_file, None),
        upstream_max_retries=r.get("UPSTREAM_MAX_RETRIES", _int, d.upstream_max_retries, _between(0, 10)),
        upstream_backoff_factor=r.get("UPSTREAM_BACKOFF_FACTOR", _float, d.upstream_backoff_factor, non_negative),
        upstream_backoff_max=r.get("UPSTREAM_BACKOFF_MAX", _float, d.upstream_backoff_max, non_negative),
        upstream_retry_after_max=r.get(
            "UPSTREAM_RETRY_AFTER_MAX", _float, d.upstream_retry_after_max, non_negative
        ),
        upstream_connect_timeout=r.get(
            "UPSTREAM_CONNECT_TIMEOUT", _float, d.upstream_connect_timeout, _at_least(0.01)
        ),
        upstream_read_timeout=r.get("UPSTREAM_READ_TIMEOUT", _float, d.upstream_read_timeout, _at_least(0.01)),
        max_body_bytes=r.get("MAX_BODY_BYTES", _int, d.max_body_bytes, positive),
        request_header_timeout=r.get("REQUEST_HEADER_TIMEOUT", _float, d.request_header_timeout, _at_least(0.1)),
        request_body_timeout=r.get("REQUEST_BODY_TIMEOUT", _float, d.request_body_timeout, _at_least(0.1)),
        request_idle_timeout=r.get("REQUEST_IDLE_TIMEOUT", _float, d.request_idle_timeout, _at_least(0.1)),
        tenant_max_pending_bodies=r.get(
            "TENANT_MAX_PENDING_BODIES", _int, d.tenant_max_pending_bodies, non_negative
        ),
        max_response_bytes=r.get("MAX_RESPONSE_BYTES", _int, d.max_response_bytes, _at_least(1024)),
        cache_max_entry_bytes=r.get("CACHE_MAX_ENTRY_BYTES", _int, d.cache_max_entry_bytes, non_negative),
        metrics_port=r.get("METRICS_PORT", _int, d.metrics_port, _between(1, 65535)),
        redis_url=r.get("REDIS_URL", _redis_url, d.redis_url),
        redis_cluster=r.get("REDIS_CLUSTER", _bool, d.redis_cluster),
        redis_max_connections=r.get("REDIS_MAX_CONNECTIONS", _int, d.redis_max_connections, positive),
        redis_socket_timeout=r.get("REDIS_SOCKET_TIMEOUT", _float, d.redis_socket_timeout, _at_least(0.01)),
        redis_request_budget=r.get("REDIS_REQUEST_BUDGET", _float, d.redis_request_budget, _between(0.01, 60.0)),
        gateway_api_keys=r.get("GATEWAY_API_KEYS", _csv, ()),
        gateway_keys_file=r.get("GATEWAY_KEYS_FILE", _existing_file, None),
        auth_disabled=r.get("AUTH_DISABLED", _bool, d.auth_disabled),
        admin_api_key=r.raw("ADMIN_API_KEY"),
        rate_limit_rpm=r.get("RATE_LIMIT_RPM", _int, 0, non_negative),
        rate_limit_tpm=r.get("RATE_LIMIT_TPM", _int, 0, non_negative),
        rate_limit_concurrency=r.get("RATE_LIMIT_CONCURRENCY", _int, 0, non_negative),
        rate_limit_fail_closed=r.get("RATE_LIMIT_FAIL_CLOSED", _bool, d.rate_limit_fail_closed),
        rate_limit_window_seconds=r.get(
            "RATE_LIMIT_WINDOW_SECONDS", _float, d.rate_limit_window_seconds, _between(1.0, 86400.0)
        ),
        rate_limit_burst=r.get("RATE_LIMIT_BURST", _float, d.rate_limit_burst, _between(0.001, 1.0)),
        embedding_provider=r.get("EMBEDDING_PROVIDER", _one_of("local", "openai"), d.embedding_provider),
        embedding_url=r.get("EMBEDDING_URL", http_base_url, None),
        embedding_api_key=r.raw("EMBEDDING_API_KEY"),
        embedding_model=r.raw("EMBEDDING_MODEL"),
        cache_enabled=r.get("CACHE_ENABLED", _bool, d.cache_enabled),
        semantic_cache_enabled=r.get("SEMANTIC_CACHE_ENABLED", _bool, d.semantic_cache_enabled),
        semantic_cache_threshold=r.get(
            "SEMANTIC_CACHE_THRESHOLD", _float, d.semantic_cache_threshold, _between(0.0, 1.0)
        ),
        semantic_max_temperature=r.get(
            "SEMANTIC_MAX_TEMPERATURE", _float, d.semantic_max_temperature, _between(0.0, 2.0)
        ),
        semantic_index_max_rows=r.get("SEMANTIC_INDEX_MAX_ROWS", _int, d.semantic_index_max_rows, positive),
        semantic_index_max_bytes=r.get("SEMANTIC_INDEX_MAX_BYTES", _int, d.semantic_index_max_bytes, positive),
        semantic_store_queue_size=r.get("SEMANTIC_STORE_QUEUE_SIZE", _int, d.semantic_store_queue_size, positive),
        cache_ttl_seconds=r.get("CACHE_TTL_SECONDS", _int, d.cache_ttl_seconds, positive),
        local_cache_size=r.get("LOCAL_CACHE_SIZE", _int, d.local_cache_size, non_negative),
        local_cache_max_bytes=r.get("LOCAL_CACHE_MAX_BYTES", _int, d.local_cache_max_bytes, non_negative),
        trusted_proxies=r.get("TRUSTED_PROXIES", _networks, ()),
        prometheus_multiproc_dir=r.raw("PROMETHEUS_MULTIPROC_DIR"),
        log_level=r.get("LOG_LEVEL", _one_of("debug", "info", "warning", "error", "critical"), "info").upper(),
    )
    if values["embedding_provider"] == "openai" and values["semantic_cache_enabled"]:
        for name in ("EMBEDDING_URL", "EMBEDDING_MODEL"):
            if r.raw(name) is None:
                r.errors.append(f"{name}: required when EMBEDDING_PROVIDER=openai (or SEMANTIC_CACHE_ENABLED=false)")
    if values["metrics_port"] == values["port"]:
        r.errors.append("METRICS_PORT: must differ from PORT (metrics are kept off the API port)")
    if r.errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(r.errors))
    return Settings(**values)


# Every environment variable the gateway reads; `.env.example` and the manifests are checked against it.
ENV_VARS: tuple[str, ...] = (
    "PORT",
    "WEB_CONCURRENCY",
    "WORKER_CONNECTIONS",
    "GRACEFUL_TIMEOUT",
    "TARGET_URL",
    "UPSTREAM_API_KEYS",
    "DEEPSEEK_API_KEY",
    "UPSTREAMS_FILE",
    "UPSTREAM_MAX_RETRIES",
    "UPSTREAM_BACKOFF_FACTOR",
    "UPSTREAM_BACKOFF_MAX",
    "UPSTREAM_RETRY_AFTER_MAX",
    "UPSTREAM_CONNECT_TIMEOUT",
    "UPSTREAM_READ_TIMEOUT",
    "MAX_BODY_BYTES",
    "REQUEST_HEADER_TIMEOUT",
    "REQUEST_BODY_TIMEOUT",
    "REQUEST_IDLE_TIMEOUT",
    "TENANT_MAX_PENDING_BODIES",
    "MAX_RESPONSE_BYTES",
    "CACHE_MAX_ENTRY_BYTES",
    "METRICS_PORT",
    "REDIS_URL",
    "REDIS_CLUSTER",
    "REDIS_MAX_CONNECTIONS",
    "REDIS_SOCKET_TIMEOUT",
    "REDIS_REQUEST_BUDGET",
    "GATEWAY_API_KEYS",
    "GATEWAY_KEYS_FILE",
    "AUTH_DISABLED",
    "ADMIN_API_KEY",
    "RATE_LIMIT_RPM",
    "RATE_LIMIT_TPM",
    "RATE_LIMIT_CONCURRENCY",
    "RATE_LIMIT_FAIL_CLOSED",
    "RATE_LIMIT_WINDOW_SECONDS",
    "RATE_LIMIT_BURST",
    "EMBEDDING_PROVIDER",
    "EMBEDDING_URL",
    "EMBEDDING_API_KEY",
    "EMBEDDING_MODEL",
    "CACHE_ENABLED",
    "SEMANTIC_CACHE_ENABLED",
    "SEMANTIC_CACHE_THRESHOLD",
    "SEMANTIC_MAX_TEMPERATURE",
    "SEMANTIC_INDEX_MAX_ROWS",
    "SEMANTIC_INDEX_MAX_BYTES",
    "SEMANTIC_STORE_QUEUE_SIZE",
    "CACHE_TTL_SECONDS",
    "LOCAL_CACHE_SIZE",
    "LOCAL_CACHE_MAX_BYTES",
    "TRUSTED_PROXIES",
    "PROMETHEUS_MULTIPROC_DIR",
    "LOG_LEVEL",
)
