"""The worker's Redis client: one pool, built after the fork, with every timeout set on purpose.

Every in-flight greenlet may hold a connection, so the pool blocks briefly (then fails fast) rather than
opening an unbounded number; pods x workers x REDIS_MAX_CONNECTIONS must stay under Redis `maxclients`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from app.concurrency import lifo_queue_class, readable_now, spawn, timeout

# The worker's client: a plain Redis or a cluster (REDIS_CLUSTER); both offer every command the gateway uses.
RedisClient: TypeAlias = redis.Redis | RedisCluster
# What "Redis failed" looks like from redis-py: its own errors, plus the cluster client's, which are not
# RedisError subclasses. Anything else is a bug in the caller and must not pass for an outage.
REDIS_FAILURES: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)
POOL_WAIT_SECONDS = 0.2
CONNECT_TIMEOUT_SECONDS = 0.5
HEALTH_CHECK_SECONDS = 30


class HubFreeConnection(redis.Connection):
    """redis-py's TCP connection, with the pool's "is anything waiting on this idle socket?" check done in one
    syscall instead of through gevent's hub.

    redis-py's pool asks `can_read()` every time it hands out a connection (data left over means a broken
    connection); with hiredis that check polls the socket through the patched `select`, about 90 us of the
    ~200 us a GET cost a gevent worker (4,000 GETs in a loop, side by side; README, "Performance").
    Here the common answer, "nothing buffered and nothing on the socket", comes from `readable_now`; anything
    else (buffered bytes, a readable or closed socket, TLS, the pure-Python parser) goes to redis-py's own check.
    This relies on hiredis' parser keeping its `hiredis.Reader` in `_reader` (pinned by
    tests/integration/test_redis_connection.py).
    """

    def can_read(self, timeout: float = 0) -> bool:
        reader = getattr(self._parser, "_reader", None)
        sock = self._sock
        if timeout == 0 and sock is not None and reader is not None and not reader.has_data() \
                and not readable_now(sock):
            return False
        return super().can_read(timeout)


def build_redis(url: str, *, cluster: bool, max_connections: int, socket_timeout: float) -> RedisClient:
    """A `redis.Redis` on a BlockingConnectionPool, or a `RedisCluster` when REDIS_CLUSTER=true.

    Plain TCP connections are `HubFreeConnection`s; a `rediss://` or `unix://` URL keeps redis-py's own class.
    """
    common: dict[str, Any] = dict(
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(CONNECT_TIMEOUT_SECONDS, socket_timeout * 2),
        health_check_interval=HEALTH_CHECK_SECONDS,
        # No hidden retries: a slow or dead Redis must cost one short timeout, then the breaker skips it.
        retry=Retry(NoBackoff(), 0),
    )
    if urlsplit(url).scheme == "redis":  # redis-py would apply a class given here to rediss:// URLs too
        common["connection_class"] = HubFreeConnection
    if cluster:
        return RedisCluster.from_url(url, max_connections=max_connections, **common)
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_SECONDS,
        queue_class=lifo_queue_class(),  # gevent's when patched: a greenlet waiting for a connection yields
        **common,
    )
    return redis.Redis(connection_pool=pool)


class BudgetSpent(redis.TimeoutError):
    """A call cut because its request had spent most of its Redis budget on earlier calls.

    The request skips Redis from here on, but this says little about Redis: on a worker short of CPU a few
    quick calls add up (the clock runs while a greenlet waits for its turn), so it must not open the breaker
    for every request (`opens_breaker`).
    """


# Failures that mean Redis cannot serve anyone right now, whatever was asked: unreachable or slow, loading,
# failing over (READONLY, CLUSTERDOWN, TRYAGAIN), out of memory. BUSY (another script past lua-time-limit) too,
# though redis-py has no class for it. Any other error answer (a script error, WRONGTYPE, a bad argument) is about
# the one call.
_DOWN: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.InvalidResponse,
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    RedisClusterException,  # slots not covered, no node reachable
)
BUDGET, DOWN, CALL = "budget", "down", "call"


def redis_failure(exc: BaseException) -> str | None:
    """What a failure says about Redis, the one place that tells: None when it is no Redis failure at all (a bug,
    to be raised); BUDGET when only this request's Redis time ran out (`BudgetSpent`: it says little about Redis);
    DOWN when Redis cannot serve anyone now; CALL when Redis answered this one call with an error."""
    if isinstance(exc, BudgetSpent):
        return BUDGET
    if isinstance(exc, _DOWN) or (isinstance(exc, redis.RedisError) and str(exc).startswith("BUSY ")):
        return DOWN
    if isinstance(exc, REDIS_FAILURES):
        return CALL
    return None


def opens_breaker(exc: BaseException) -> bool:
    """Whether a Redis failure says Redis is down or slow for everyone (not only that one request's budget ran out)."""
    return redis_failure(exc) != BUDGET


class RedisBudget:
    """The time one request may spend waiting on Redis, across every call it makes (limiter, cache, settle).

    A slow Redis then costs a request at most this once: a call is cut when the budget runs out, and a request
    whose budget is spent skips Redis for the rest of its life. A call that had at least half the budget and
    still did not answer raises `redis.TimeoutError`, which opens the caller's breaker; a call cut with less
    left raises `BudgetSpent`, which does not. The cut needs gevent's patched sockets (the gunicorn worker);
    elsewhere only the socket timeout bounds a call, and the time is still counted.
    """

    __slots__ = ("left", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.left = seconds

    @property
    def spent(self) -> bool:
        return self.left <= 0

    @contextmanager
    def bound(self) -> Iterator[None]:
        """Run one Redis call within what is left of the budget."""
        if self.left <= 0:
            raise BudgetSpent("this request's Redis time budget is spent")
        started = time.monotonic()
        allowed = self.left
        cut = timeout(allowed)
        try:
            if cut is None:
                yield
                return
            try:
                with cut:
                    yield
            except BaseException as exc:
                if exc is not cut:
                    raise
                # redis-py has closed the connection the cut call was using (it does on any BaseException).
                if allowed < self.seconds / 2:
                    raise BudgetSpent("this request's Redis time budget ran out") from None
                raise redis.TimeoutError("Redis did not answer within this request's time budget") from None
        finally:
            self.left -= time.monotonic() - started


def is_cluster(client: RedisClient) -> bool:
    """A cluster client routes each key to its node: no single connection to send a pipeline on, and its pipelines
    refuse script calls."""
    return isinstance(client, RedisCluster)


def send_now(client: RedisClient, commands: list[tuple[Any, ...]]) -> Callable[[], list[Any]]:
    """Send ``commands`` now, on one connection, and return the function that reads their replies: raw, as Redis
    sent them (``b"OK"``, not redis-py's ``True``), an error reply as its exception (as
    ``pipeline.execute(raise_on_error=False)`` gives it). The caller works while they travel.

    This is redis-py's pipeline split in two, on its connection API (``get_connection``, ``pack_commands``,
    ``send_packed_command``, ``read_response``, ``release``): a look-up embeds its query while its GET is on the
    wire (on this project's VM a round trip from an idle worker is ~0.45 ms of waiting). The reader must be called
    exactly once: it gives the connection back to the pool, or drops it when a read failed or was cut (a budget's
    gevent Timeout), so no reply is left for the next user. A cluster client has no one connection to send on: its
    pipeline, which routes each key to its node, is sent when the reader is called (replies then as redis-py
    parses them, ``True`` for ``b"OK"``).
    """
    if is_cluster(client):
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return lambda: pipe.execute(raise_on_error=False)
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        connection.send_packed_command(connection.pack_commands(commands))
    except BaseException:
        connection.disconnect()
        pool.release(connection)
        raise

    done = False

    def read() -> list[Any]:
        nonlocal done
        if done:  # a second release would put the connection in the pool twice: two users on one socket
            raise RuntimeError("send_now's replies were already read")
        done = True
        replies: list[Any] = []
        try:
            for _ in commands:
                try:
                    replies.append(connection.read_response())
                except redis.ResponseError as exc:  # this command failed; the connection is fine
                    replies.append(exc)
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)
        return replies

    return read


def bounded(budget: RedisBudget | None) -> AbstractContextManager[None]:
    """`budget.bound()`, or no bound for a caller without a request budget (background work, tools)."""
    return nullcontext() if budget is None else budget.bound()


def background_ping(client: RedisClient, seconds: float) -> Callable[[Any], None]:
    """A breaker prober for Redis: a PING in a greenlet of its own, cut after `seconds`, reported to the breaker.

    Only where gevent runs greenlets (the gunicorn worker); elsewhere give the breaker no prober.
    """

    def probe(breaker: Any) -> None:
        def ping() -> None:
            started = time.time()
            try:
                with timeout(seconds, redis.TimeoutError("Redis probe timed out")) or nullcontext():
                    client.ping()
            except REDIS_FAILURES:
                breaker.failed(time.time())
            else:
                breaker.succeeded(started)

        spawn(ping)

    return probe
