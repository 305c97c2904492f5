"""The worker's Redis connections answer redis-py's "anything left on this idle socket?" without gevent's hub
(app/redis_client.HubFreeConnection), and still tell a clean connection from a dirty or closed one."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from app.redis_client import HubFreeConnection, build_redis, send_now
from tests.support import REDIS_URL

pytestmark = [pytest.mark.redis]


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    built = build_redis(REDIS_URL, cluster=False, max_connections=4, socket_timeout=2)
    yield built
    built.connection_pool.disconnect()  # a pool given to redis.Redis is not closed with it


def test_the_pool_hands_out_hub_free_connections_for_plain_tcp(client: redis.Redis) -> None:
    assert client.connection_pool.connection_class is HubFreeConnection
    tls = build_redis("rediss://127.0.0.1:1/0", cluster=False, max_connections=1, socket_timeout=1)
    assert tls.connection_pool.connection_class is redis.SSLConnection  # TLS keeps redis-py's own class


def test_an_idle_connection_reads_as_clean_and_the_hiredis_reader_is_where_the_check_expects_it(
        client: redis.Redis) -> None:
    key = f"test:conn:{uuid.uuid4().hex}"
    client.set(key, "v", ex=30)
    conn = client.connection_pool.get_connection()
    try:
        # The fast path reads the parser's buffered replies: if redis-py moves hiredis' reader, this fails first.
        assert getattr(conn._parser, "_reader", None) is not None
        assert conn.can_read() is False
        conn.send_command("GET", key)  # an answer is now waiting on the socket
        deadline = time.monotonic() + 2
        while not conn.can_read() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert conn.can_read() is True
        assert conn.read_response() == b"v"
        assert conn.can_read() is False
    finally:
        client.connection_pool.release(conn)


def test_a_connection_the_server_closed_is_replaced_not_used(client: redis.Redis) -> None:
    key = f"test:conn:{uuid.uuid4().hex}"
    client.set(key, "before", ex=30)
    conn = client.connection_pool.get_connection()
    my_id = conn.send_command("CLIENT", "ID") or conn.read_response()
    client.connection_pool.release(conn)
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        assert admin.client_kill_filter(_id=my_id) == 1
    finally:
        admin.close()
    # The pool's check sees the closed socket (readable: EOF) and reconnects; the command succeeds.
    assert client.get(key) == b"before"


def test_commands_sent_now_are_read_later_in_order_with_an_error_reply_as_its_exception() -> None:
    """`send_now` is a pipeline split in two: the replies come back in order once read, a failed command as its
    exception (the others still answered), and the connection goes back to the pool for the next user."""
    single = build_redis(REDIS_URL, cluster=False, max_connections=1, socket_timeout=2)
    key = f"gw:test:sent:{uuid.uuid4().hex}"
    read = send_now(single, [("SET", key, "text", "EX", 60), ("INCR", key), ("GET", key)])
    assert read is not None
    written, failed, value = read()
    assert written == b"OK" and isinstance(failed, redis.ResponseError) and value == b"text"  # raw replies
    assert single.get(key) == b"text"  # the pool's only connection is back (else: no connection available)
    single.delete(key)
    single.connection_pool.disconnect()


def test_a_read_that_fails_drops_the_connection_so_no_reply_is_left_for_the_next_user() -> None:
    """A read cut short (here by the socket timeout; in a worker also by the request's Redis budget) must not hand
    a connection with a reply still on its way to the next caller, who would read that reply as its own."""
    slow = build_redis(REDIS_URL, cluster=False, max_connections=1, socket_timeout=0.2)
    key = f"gw:test:late:{uuid.uuid4().hex}"
    slow.set(key, "mine", ex=60)
    read = send_now(slow, [("BLPOP", f"gw:test:empty:{uuid.uuid4().hex}", 1)])
    assert read is not None
    with pytest.raises(redis.TimeoutError):
        read()
    time.sleep(1.1)  # the BLPOP's own late answer (nil) would be on the old connection by now
    assert slow.get(key) == b"mine"
    slow.delete(key)
    slow.connection_pool.disconnect()
