"""Typed settings, read once from the environment (and `.env`) and validated at start.

Every variable the gateway reads is declared here, once: a field of `Settings` with its type, default, check and
help. Parsing, `ENV_VARS`, `.env.example` and the README's table (tools/settings_docs.py) are derived from it.
`Settings.from_env()` parses all of them and raises one `ConfigError` that names every bad variable, so an operator
fixes a deployment in one go.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


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



def _networks(value: str) -> tuple[str, ...]:
    entries = _csv(value)
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"{entry!r} is not an address or CIDR") from None
    return entries


def _origins(value: str) -> tuple[str, ...]:
    """Browser origins allowed to call the API: `*`, or `scheme://host[:port]` each (lower-cased, no path)."""
    origins = []
    for entry in _csv(value):
        if entry == "*":
            origins.append(entry)
            continue
        try:
            parts = urlsplit(entry)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError(f"{entry!r} is not an origin (scheme://host[:port])") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
                or parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"{entry!r} is not an origin (scheme://host[:port]) or '*'")
        origins.append(f"{parts.scheme}://{parts.netloc}".lower())
    return tuple(origins)


def _existing_file(value: str) -> str:
    if not Path(value).is_file():
        raise ValueError("file not found")
    return value



def _one_of(*choices: str, upper: bool = False) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value.upper() if upper else value.lower()

    return parse


def _at_least(low: float) -> Callable[[float], str | None]:
    return lambda v: None if v >= low else f"must be at least {low:g}"


def _between(low: float, high: float) -> Callable[[float], str | None]:
    return lambda v: None if low <= v <= high else f"must be between {low:g} and {high:g}"


_POSITIVE, _NON_NEGATIVE, _A_PORT, _A_TIMEOUT = _at_least(1), _at_least(0), _between(1, 65535), _at_least(0.01)
_MIB = 1024 * 1024


def setting(default: Any, help: str, *, check: Callable[[Any], str | None] | None = None,
            parse: Callable[[str], Any] | None = None, section: str | None = None, shown: str | None = None,
            one_more: tuple[str, str] | None = None) -> Any:
    """Declare one variable: a `Settings` field whose upper-cased name is the environment variable.

    `parse` defaults to the field's type; `check` refuses a parsed value with a reason; `help` is the line in
    `.env.example` and the README table (tools/settings_docs.py writes both); `section` starts a group there;
    `shown` is the default as the docs state it where the value says nothing (None, decided elsewhere).
    `one_more` names a second variable (and its help) whose value is added to this list.
    """
    meta = {"help": help, "check": check, "parse": parse, "section": section, "shown": shown, "one_more": one_more}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """The gateway's whole configuration, and the one table of its environment variables: each field is the
    variable of its name in upper case (`port` is PORT), declared with `setting(default, help, check=...)`.

    Build it with `Settings.from_env()`; tests pass their own.
    """

    port: int = setting(8080, "listen port (the API)", check=_A_PORT, section="server (gunicorn)")
    metrics_port: int = setting(9090, "`/metrics` is served here only, never on `PORT`; this port also answers "
                                "`/healthz` and `/readyz` (as `PORT` does) and nothing else; keep it off the "
                                "public network", check=_A_PORT)
    web_concurrency: int = setting(2, "gunicorn worker processes (about one per CPU)", check=_POSITIVE)
    worker_connections: int = setting(1000, "gevent connections per worker", check=_POSITIVE)
    graceful_timeout: int = setting(120, "seconds in-flight requests and streams get after SIGTERM",
                                    check=_NON_NEGATIVE)

    target_url: str = setting("https://api.deepseek.com", "upstream root; `/v1/...` is appended, a trailing `/v1` "
                              "is not doubled", parse=http_base_url, section="upstream (any OpenAI-compatible API)")
    upstream_api_keys: tuple[str, ...] = setting((), "comma-separated upstream keys, balanced over",
                                                 one_more=("DEEPSEEK_API_KEY", "counts as one more upstream key"))
    upstreams_file: str | None = setting(None, "optional YAML: several backends, their models, keys and weights "
                                         "(README, \"Several upstreams\")", parse=_existing_file)
    fallback_deadline_seconds: float = setting(60.0, "one deadline for a whole fallback chain (`fallbacks` in "
                                               "`UPSTREAMS_FILE`), from the request's arrival: no hop starts or "
                                               "runs past it", check=_at_least(0.1))
    upstream_max_retries: int = setting(3, "retries after the first attempt (3 = up to 4 attempts)",
                                        check=_between(0, 10))
    upstream_backoff_factor: float = setting(0.5, "exponential backoff factor (with as much jitter)",
                                             check=_NON_NEGATIVE)
    upstream_backoff_max: float = setting(8.0, "longest backoff between attempts", check=_NON_NEGATIVE)
    upstream_retry_after_max: float = setting(10.0, "longest `Retry-After` waited for on one key; a longer one "
                                              "moves to another key, or to the client", check=_NON_NEGATIVE)
    upstream_connect_timeout: float = setting(5.0, "connect timeout to the upstream", check=_A_TIMEOUT)
    upstream_read_timeout: float = setting(120.0, "longest silence between bytes from the upstream",
                                           check=_A_TIMEOUT)
    max_body_bytes: int = setting(10 * _MIB, "largest request body (a chunk declaring more is refused at once)",
                                  check=_POSITIVE)
    request_header_timeout: float = setting(10.0, "longest time to receive a request head, from its first byte "
                                            "(then 408)", check=_at_least(0.1))
    request_body_timeout: float = setting(60.0, "longest time to receive a request body, from the end of its head "
                                          "(then 408)", check=_at_least(0.1))
    request_idle_timeout: float = setting(10.0, "longest silence while a request head or body is arriving "
                                          "(then 408)", check=_at_least(0.1))
    tenant_max_pending_bodies: int = setting(64, "per worker: requests of one tenant whose body is still arriving; "
                                             "more are refused at once (429); 0 = no bound", check=_NON_NEGATIVE)
    max_response_bytes: int = setting(32 * _MIB, "largest upstream answer (plain or streamed) passed on; larger: "
                                      "502, counted, never stored", check=_at_least(1024))
    cache_max_entry_bytes: int = setting(2 * _MIB, "largest answer stored in any cache layer; larger ones are "
                                         "passed on unstored", check=_NON_NEGATIVE)

    redis_url: str = setting("redis://127.0.0.1:6379/0", "`redis://`, `rediss://`, or a cluster node with "
                             "`REDIS_CLUSTER=true`", parse=_redis_url, section="Redis")
    redis_cluster: bool = setting(False, "talk Redis Cluster")
    redis_max_connections: int = setting(200, "connection pool per worker: pods x workers x this must stay under "
                                         "Redis maxclients", check=_POSITIVE)
    redis_socket_timeout: float = setting(0.5, "a slower Redis counts as down (cache bypassed, limiter per "
                                          "`RATE_LIMIT_FAIL_CLOSED`)", check=_A_TIMEOUT)
    redis_request_budget: float = setting(0.5, "Redis time one request may spend in all (limiter, cache, "
                                          "settlement): a slow Redis costs a request at most this, once, then the "
                                          "breaker skips it", check=_between(0.01, 60.0))

    gateway_api_keys: tuple[str, ...] = setting((), "client keys, comma-separated: `key` or `tenant:key`",
                                                section="clients")
    gateway_keys_file: str | None = setting(None, "optional YAML: tenants, keys (or their SHA-256), limits, allowed "
                                            "models", parse=_existing_file)
    auth_disabled: bool = setting(False, "`true` lets requests in without a client key (development only)")
    admin_api_key: str | None = setting(
        None, "key for `/admin/*` (the cache, upstream keys, client keys at run time); unset = admin endpoints off")

    rate_limit_rpm: int = setting(0, "default requests per minute of a tenant (0 = off)", check=_NON_NEGATIVE,
                                  section="rate limits (per tenant; 0 = off)")
    rate_limit_tpm: int = setting(0, "default tokens per minute of a tenant (0 = off)", check=_NON_NEGATIVE)
    rate_limit_concurrency: int = setting(0, "default requests in flight of a tenant (0 = off)",
                                          check=_NON_NEGATIVE)
    rate_limit_fail_closed: bool = setting(False, "refuse (503) when Redis cannot be asked (false: each worker "
                                           "keeps limit / `WEB_CONCURRENCY`)")
    rate_limit_window_seconds: float = setting(60.0, "the span RPM and TPM count over (shorter only for tests)",
                                               check=_between(1.0, 86400.0))
    rate_limit_burst: float = setting(0.1, "share of RPM/TPM an idle tenant may spend at once (at least 1 request); "
                                      "any sliding window admits at most (1 + this) x the limit",
                                      check=_between(0.001, 1.0))

    prices_file: str | None = setting(None, "YAML: USD per million input, cached-input and output tokens per model "
                                      "(README, \"Spend\")", parse=_existing_file,
                                      shown="the shipped list, app/spend/prices.yaml (DeepSeek, OpenAI; dated)",
                                      section="spend and budgets")
    spend_retention_days: int = setting(400, "days the daily spend rollups (`/admin/spend`) are kept in Redis",
                                        check=_between(1, 3660))
    budget_test_window_seconds: float | None = setting(
        None, "TESTS ONLY: budget windows of this many seconds instead of a UTC day (and 30 of them instead of a "
        "calendar month); never set in production", check=_between(1.0, 86400.0))

    cache_enabled: bool = setting(True, "the whole cache (L0, L1, L2) on or off", section="cache")
    cache_ttl_seconds: int = setting(86400, "lifetime of a cached answer (`X-Cache-TTL` overrides it per request)",
                                     check=_POSITIVE)
    local_cache_size: int = setting(1024, "L0 entries per worker (0 = L0 off)", check=_NON_NEGATIVE)
    local_cache_max_bytes: int = setting(64 * _MIB, "L0 bytes per worker", check=_NON_NEGATIVE)
    local_cache_outage_seconds: float = setting(
        30.0, "while Redis is unreachable, L0 keeps answering for this long after the worker last read the "
        "invalidation counters (a deletion made meanwhile reaches it at most this late); 0 = no cache at all "
        "during an outage", check=_between(0.0, 3600.0))
    semantic_cache_enabled: bool = setting(True, "L2 on or off")
    semantic_cache_threshold: float | None = setting(
        None, "least cosine (local MiniLM) an L2 hit needs, on top of the verifier's rules and score: raising it "
        "never serves more; 0.99 is strict (≤ 0.5 % false hits on both dev sets)", check=_between(0.0, 1.0),
        shown='0.6, measured (README: "Semantic cache: measured")')
    semantic_max_temperature: float = setting(0.7, "above this temperature L2 is skipped", check=_between(0.0, 2.0))
    semantic_index_max_rows: int = setting(100_000, "L2 index rows per worker, all partitions together (oldest "
                                           "rows go first)", check=_POSITIVE)
    semantic_index_max_bytes: int = setting(64 * _MIB, "L2 index bytes per worker (oldest rows go first)",
                                            check=_POSITIVE)
    semantic_store_queue_size: int = setting(1000, "L2 writes waiting to run after their answer has gone; past "
                                             "it a write is dropped and counted", check=_POSITIVE)

    embedding_provider: str = setting("local", "`local` (in-process MiniLM, no download) or `openai` (remote API)",
                                      parse=_one_of("local", "openai"), section="embeddings for L2")
    embedding_url: str | None = setting(None, "remote embeddings API root (`EMBEDDING_PROVIDER=openai`)",
                                        parse=http_base_url)
    embedding_api_key: str | None = setting(None, "key for the remote embeddings API")
    embedding_model: str | None = setting(None, "model of the remote embeddings API")
    embedding_read_timeout: float = setting(3.0, "longest silence from the remote embeddings API; a slower one counts "
                                            "as failed and the request skips L2 (an embedding only saves money if "
                                            "it is quick)", check=_A_TIMEOUT)

    trusted_proxies: tuple[str, ...] = setting((), "addresses/CIDRs whose `X-Forwarded-For` is believed (client "
                                               "address in logs; e.g. 127.0.0.1,10.0.0.0/8)", parse=_networks,
                                               section="operations")
    cors_allow_origins: tuple[str, ...] = setting((), "browser origins allowed to call the API: comma-separated "
                                                  "`scheme://host[:port]`, or `*` (preflights need no key; other "
                                                  "origins get no CORS headers); empty: CORS off",
                                                  parse=_origins)
    prometheus_multiproc_dir: str | None = setting(None, "metrics directory shared by the workers, wiped at start",
                                                   shown="a fresh temp dir")
    log_level: str = setting("INFO", "logging level",
                             parse=_one_of("debug", "info", "warning", "error", "critical", upper=True))

    # OpenTelemetry's own variables, read by its SDK (app/observability/tracing.py hands `.env`'s values on to it);
    # the SDK's other OTEL_* variables (OTEL_EXPORTER_OTLP_HEADERS, OTEL_BSP_*, ...) work from the environment.
    otel_exporter_otlp_endpoint: str | None = setting(
        None, "OTLP/HTTP collector root (`/v1/traces` is appended): traces are off unless this or the next is set",
        parse=http_base_url, section="traces (OpenTelemetry, README \"Observability: traces\")")
    otel_exporter_otlp_traces_endpoint: str | None = setting(
        None, "OTLP/HTTP traces URL, taken as it is (wins over the root above)", parse=http_base_url)
    otel_service_name: str | None = setting(None, "`service.name` of the spans", shown="g-aigateway")
    otel_traces_sampler: str | None = setting(
        None, "the SDK's sampler: `parentbased_traceidratio`, `traceidratio`, `always_on`, ...",
        shown="parentbased_always_on (every trace)")
    otel_traces_sampler_arg: float | None = setting(None, "the ratio sampled by the `*traceidratio` samplers",
                                                    check=_between(0.0, 1.0), shown="1.0")

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


def _parser(f: Field[Any]) -> Callable[[str], Any]:
    """The field's own `parse`, else the one for its declared type."""
    parse = f.metadata["parse"] or _BY_TYPE.get(str(f.type))
    if parse is None:
        raise TypeError(f"Settings.{f.name}: no parser for {f.type}; pass setting(..., parse=...)")
    return parse


# Free text is taken as written (stripped); the other types are parsed, with the reason when they do not.
_BY_TYPE: dict[str, Callable[[str], Any]] = {
    "int": _int, "float": _float, "float | None": _float, "bool": _bool, "tuple[str, ...]": _csv,
    "str": str, "str | None": str,
}


@dataclass(frozen=True)
class Variable:
    """One environment variable of the table, as `Settings` declares it."""

    name: str
    field: str
    parse: Callable[[str], Any]
    default: Any
    check: Callable[[Any], str | None] | None
    help: str
    section: str | None
    shown: str | None
    one_more: tuple[str, str] | None


VARIABLES: tuple[Variable, ...] = tuple(
    Variable(f.name.upper(), f.name, _parser(f), f.default, f.metadata["check"], f.metadata["help"],
             f.metadata["section"], f.metadata["shown"], f.metadata["one_more"])
    for f in fields(Settings)
)
# Every environment variable the gateway reads; `.env.example`, the README and the manifests are checked against it.
ENV_VARS: tuple[str, ...] = tuple(
    name for v in VARIABLES for name in (v.name, *(v.one_more[:1] if v.one_more else ()))
)


def _raw(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None  # an empty value means unset
    return value.strip()


def _read(env: Mapping[str, str], var: Variable, errors: list[str]) -> Any:
    """The variable's value, or its default (noting why in `errors` when the value is bad)."""
    value = _parsed(env, var, errors)
    if var.one_more and (more := _raw(env, var.one_more[0])) and more not in value:
        value = (*value, more)
    return value


def _parsed(env: Mapping[str, str], var: Variable, errors: list[str]) -> Any:
    value = _raw(env, var.name)
    if value is None:
        return var.default
    try:
        parsed = var.parse(value)
    except ValueError as exc:
        errors.append(f"{var.name}={_shown(var.name, value)!s}: {exc}")
        return var.default
    problem = var.check(parsed) if var.check else None
    if problem:
        errors.append(f"{var.name}={_shown(var.name, value)!s}: {problem}")
        return var.default
    return parsed


def _parse(env: Mapping[str, str]) -> Settings:
    errors: list[str] = []
    values = {var.field: _read(env, var, errors) for var in VARIABLES}
    if values["embedding_provider"] == "openai" and values["semantic_cache_enabled"]:
        for name in ("EMBEDDING_URL", "EMBEDDING_MODEL"):
            if _raw(env, name) is None:
                errors.append(f"{name}: required when EMBEDDING_PROVIDER=openai (or SEMANTIC_CACHE_ENABLED=false)")
    if values["metrics_port"] == values["port"]:
        errors.append("METRICS_PORT: must differ from PORT (metrics are kept off the API port)")
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return Settings(**values)
