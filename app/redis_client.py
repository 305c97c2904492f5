"""The worker's Redis client: one pool, built after the fork, with every timeout set on purpose.

Every in-flight greenlet may hold a connection, so the pool blocks briefly (then fails fast) rather than
opening an unbounded number; pods x workers x REDIS_MAX_CONNECTIONS must stay under Redis `maxclients`.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

# What "Redis failed" looks like from redis-py: its own errors, plus the cluster client's, which are not
# RedisError subclasses. Anything else is a bug in the caller and must not pass for an outage.
REDIS_FAILURES: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)
POOL_WAIT_SECONDS = 0.2
CONNECT_TIMEOUT_SECONDS = 0.5
HEALTH_CHECK_SECONDS = 30


def _queue_class() -> type:
    """gevent's LIFO queue when gevent is patched in, so waiting greenlets yield instead of blocking."""
    try:
        from gevent import monkey

        if monkey.is_module_patched("socket"):
            from gevent.queue import LifoQueue

            return LifoQueue
    except ImportError:  # gevent is always installed; stdlib is the fallback for scripts
        pass
    from queue import LifoQueue

    return LifoQueue


def build_redis(url: str, *, cluster: bool, max_connections: int, socket_timeout: float) -> Any:
    """A `redis.Redis` on a BlockingConnectionPool, or a `RedisCluster` when REDIS_CLUSTER=true."""
    common: dict[str, Any] = dict(
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(CONNECT_TIMEOUT_SECONDS, socket_timeout * 2),
        health_check_interval=HEALTH_CHECK_SECONDS,
        # No hidden retries: a slow or dead Redis must cost one short timeout, then the breaker skips it.
        retry=Retry(NoBackoff(), 0),
    )
    if cluster:
        return RedisCluster.from_url(url, max_connections=max_connections, **common)
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_SECONDS,
        queue_class=_queue_class(),
        **common,
    )
    return redis.Redis(connection_pool=pool)
