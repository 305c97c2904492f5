"""G-AIGateway: an OpenAI-compatible LLM gateway with a hybrid (exact + semantic) cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.breaker import Breaker
from app.config import Settings

if TYPE_CHECKING:
    from flask import Flask

    from app.auth import Authenticator
    from app.cache.service import CacheService
    from app.ratelimit.admission import Admission
    from app.redis_client import RedisClient
    from app.spend.service import Spend
    from app.upstream.fallbacks import FallbackRules
    from app.upstream.pool import UpstreamPool


def create_app(settings: Settings | None = None) -> Flask:
    """Build every service once for this worker (after gunicorn's fork) and wire the blueprints.

    Flask (in `app.proxy.flask_app`) is imported here, not at the top: tools that only need a part of the package
    (the master's `app.ratelimit.reap`, which must start fast) do not pay for it.
    """
    from app.auth import TenantLimits, build_authenticator
    from app.concurrency import gevent_patched
    from app.gateway import Gateway
    from app.observability import tracing
    from app.observability.logging import configure_logging
    from app.proxy import admin, admin_keys, body, context, cors, errors, routes, system
    from app.proxy.flask_app import GatewayFlask
    from app.redis_client import background_ping, build_redis
    from app.upstream.backends import backends_from_settings
    from app.upstream.client import UpstreamClient
    from app.upstream.health import KeyHealth
    from app.upstream.http import build_retry, build_session
    from app.upstream.pool import UpstreamPool
    from app.upstream.scrub import KeyScrubber

    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    tracing.configure(settings)  # per worker, after the fork: off unless an OTLP endpoint is set

    redis = build_redis(settings.redis_url, cluster=settings.redis_cluster,
                        max_connections=settings.redis_max_connections,
                        socket_timeout=settings.redis_socket_timeout)
    default_limits = TenantLimits(settings.rate_limit_rpm, settings.rate_limit_tpm, settings.rate_limit_concurrency)
    auth = build_authenticator(settings.gateway_api_keys, settings.gateway_keys_file,
                               disabled=settings.auth_disabled, default_limits=default_limits,
                               runtime_keys=bool(settings.admin_api_key))
    retry = build_retry(retries=settings.upstream_max_retries, backoff_factor=settings.upstream_backoff_factor,
                        backoff_max=settings.upstream_backoff_max,
                        retry_after_max=settings.upstream_retry_after_max)
    backends = backends_from_settings(settings.target_url, settings.upstream_api_keys, settings.upstreams_file)
    pool = UpstreamPool(backends, KeyHealth(redis))
    fallbacks = _fallback_rules(settings, pool, auth)
    session = build_session(retry=retry, pool_size=settings.upstream_pool_size, hosts=len(backends))
    upstream = UpstreamClient(session, pool,
                              connect_timeout=settings.upstream_connect_timeout,
                              read_timeout=settings.upstream_read_timeout,
                              max_response_bytes=settings.max_response_bytes,
                              scrub=KeyScrubber(k.secret for b in backends for k in b.keys if k.secret).scrub)

    # One breaker for Redis: the cache and the limiter skip it together, and one probe finds it back for both.
    # Its probes are PINGs of its own (in the gevent worker), so no request waits on a Redis that may still be slow.
    redis_breaker = Breaker(close_after=REDIS_PROBES_TO_CLOSE, prober=background_ping(
        redis, settings.redis_request_budget) if gevent_patched() else None)
    cache = _build_cache(settings, redis, redis_breaker) if settings.cache_enabled else None
    keys = None
    if not settings.auth_disabled:
        from app.keys.service import KeyService
        from app.keys.store import KeyStore

        keys = auth.runtime = KeyService(KeyStore(redis), auth, redis_breaker)
    limiter = _build_admission(settings, redis, auth, redis_breaker)
    spend = _build_spend(settings, redis, redis_breaker)

    app = GatewayFlask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    app.extensions["gateway"] = Gateway(
        settings=settings, redis=redis, auth=auth, upstream=upstream, spend=spend, cache=cache, limiter=limiter,
        trusted_networks=context.parse_networks(settings.trusted_proxies),
        pending_bodies=body.PendingBodies(settings.tenant_max_pending_bodies), keys=keys, fallbacks=fallbacks,
    )
    app.wsgi_app = context.canonical_paths(context.close_on_failure(app.wsgi_app))  # type: ignore[method-assign]
    app.before_request(context.start_request)
    app.after_request(context.finish_request)
    cors.register_cors(app, settings.cors_allow_origins)  # after start_request: a preflight is logged too
    errors.register_error_handlers(app)
    app.register_blueprint(routes.bp)
    app.register_blueprint(system.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(admin_keys.bp)
    return app


# Probes in a row a Redis that failed must answer before every request uses it again: a Redis busy with long
# commands answers in short gaps, and one answer in a gap must not send every request back to wait.
REDIS_PROBES_TO_CLOSE = 3


def _fallback_rules(settings: Settings, pool: UpstreamPool, auth: Authenticator) -> FallbackRules | None:
    """UPSTREAMS_FILE's chains and the tenants' own; every model they name must be served here (checked at start,
    not found missing by the first failover). None when no chain is configured anywhere."""
    from pathlib import Path

    from app.upstream.fallbacks import FallbackConfigError, load_fallback_rules, rule_models

    path = Path(settings.upstreams_file) if settings.upstreams_file else None
    rules = load_fallback_rules(path, settings.fallback_deadline_seconds)
    tenant_models = {m for t in auth.tenants for m in rule_models(t.fallbacks)}
    unknown = sorted(m for m in rules.models() | tenant_models if not pool.knows_model(m))
    if unknown:
        raise FallbackConfigError(f"fallback rules name models no backend serves: {', '.join(unknown)}")
    if not rules and not tenant_models:
        return None
    return rules


def _build_cache(settings: Settings, redis: RedisClient, breaker: Breaker) -> CacheService:
    import atexit

    from app.cache.local import LocalCache
    from app.cache.semantic import IndexBounds
    from app.cache.service import CacheOptions, CacheService
    from app.concurrency import gevent_patched

    embedder = static = None
    if settings.semantic_cache_enabled:
        from app.embeddings.base import build_embedder
        from app.embeddings.static import StaticEmbedder

        embedder = build_embedder(settings.embedding_provider, url=settings.embedding_url,
                                  api_key=settings.embedding_api_key, model=settings.embedding_model,
                                  # An embedding only saves money if it is quick: a slow API must not hold
                                  # requests for long before they go upstream anyway.
                                  connect_timeout=min(settings.upstream_connect_timeout, 2.0),
                                  read_timeout=settings.embedding_read_timeout, max_retries=1)
        # The first stage: a memory-mapped table shared by the workers. The transformer loads when a worker first
        # meets a candidate that survives the cheap checks: a worker that never does, never spends its memory.
        static = StaticEmbedder()
    options = CacheOptions(
        ttl_seconds=settings.cache_ttl_seconds, semantic_enabled=settings.semantic_cache_enabled,
        semantic_threshold=settings.semantic_cache_threshold,
        semantic_max_temperature=settings.semantic_max_temperature,
        index_bounds=IndexBounds(settings.semantic_index_max_rows, settings.semantic_index_max_bytes),
        store_queue_size=settings.semantic_store_queue_size,
        max_entry_bytes=settings.cache_max_entry_bytes,
        outage_local_seconds=settings.local_cache_outage_seconds,
    )
    cache = CacheService(redis, options, LocalCache(settings.local_cache_size, settings.local_cache_max_bytes),
                         embedder, static, breaker)
    if gevent_patched():  # only there do writes wait (app/cache/write_behind.py): the last few ms leave at exit
        atexit.register(cache.write_behind.flush)
    return cache


def _build_spend(settings: Settings, redis: RedisClient, breaker: Breaker) -> Spend:
    """Prices (PRICES_FILE or the shipped list) and this worker's rollup buffer, flushed once more at its exit."""
    import atexit

    from app.spend.ledger import SpendLedger
    from app.spend.prices import load_prices
    from app.spend.service import Spend

    ledger = SpendLedger(redis, breaker, retention_days=settings.spend_retention_days)
    if ledger.background:
        atexit.register(ledger.flush_quietly)
    return Spend(load_prices(settings.prices_file), ledger)


def _build_admission(settings: Settings, redis: RedisClient, auth: Authenticator,
                     breaker: Breaker) -> Admission | None:
    """A limiter only when some tenant has a limit or a budget, or may get one (keys issued at run time carry their
    own): otherwise admission costs nothing at all."""
    from app.ratelimit.admission import Admission
    from app.ratelimit.limiter import RateLimiter, RateLimiterUnavailable

    limited = any(t.limits.any or any(m.any for m in t.model_limits.values()) or t.budget is not None
                  for t in auth.tenants)
    if not limited and auth.runtime is None:
        return None
    limiter = RateLimiter(redis)
    try:
        limiter.ensure_loaded()  # SCRIPT LOAD once per worker; EVALSHA reloads by itself after a flush
    except RateLimiterUnavailable:
        pass  # Redis down at start: the first call loads the script
    return Admission(limiter, fail_closed=settings.rate_limit_fail_closed,
                     window_seconds=settings.rate_limit_window_seconds, burst=settings.rate_limit_burst,
                     workers=settings.web_concurrency, breaker=breaker,
                     budget_window_seconds=settings.budget_test_window_seconds)
