"""G-AIGateway: an OpenAI-compatible LLM gateway with a hybrid (exact + semantic) cache."""

from __future__ import annotations

from flask import Flask

from app.config import Settings


def create_app(settings: Settings | None = None) -> Flask:
    """Build every service once for this worker (after gunicorn's fork) and wire the blueprints."""
    from app.auth import TenantLimits, build_authenticator
    from app.gateway import Gateway
    from app.observability.logging import configure_logging
    from app.proxy import admin, context, errors, routes, system
    from app.redis_client import build_redis
    from app.upstream.client import UpstreamClient
    from app.upstream.http import build_retry, build_session
    from app.upstream.pool import KeyHealth, UpstreamPool, backends_from_settings

    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)

    redis = build_redis(settings.redis_url, cluster=settings.redis_cluster,
                        max_connections=settings.redis_max_connections,
                        socket_timeout=settings.redis_socket_timeout)
    default_limits = TenantLimits(settings.rate_limit_rpm, settings.rate_limit_tpm, settings.rate_limit_concurrency)
    auth = build_authenticator(settings.gateway_api_keys, settings.gateway_keys_file,
                               disabled=settings.auth_disabled, default_limits=default_limits)
    retry = build_retry(retries=settings.upstream_max_retries, backoff_factor=settings.upstream_backoff_factor,
                        backoff_max=settings.upstream_backoff_max,
                        retry_after_max=settings.upstream_retry_after_max)
    pool = UpstreamPool(
        backends_from_settings(settings.target_url, settings.upstream_api_keys, settings.upstreams_file),
        KeyHealth(redis),
    )
    upstream = UpstreamClient(build_session(retry=retry, pool_size=settings.upstream_pool_size), pool,
                              connect_timeout=settings.upstream_connect_timeout,
                              read_timeout=settings.upstream_read_timeout)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    app.extensions["gateway"] = Gateway(
        settings=settings, redis=redis, auth=auth, upstream=upstream,
        trusted_networks=context.parse_networks(settings.trusted_proxies),
    )
    app.before_request(context.start_request)
    app.after_request(context.finish_request)
    errors.register_error_handlers(app)
    app.register_blueprint(routes.bp)
    app.register_blueprint(system.bp)
    app.register_blueprint(admin.bp)
    return app
