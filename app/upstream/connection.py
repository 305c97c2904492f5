"""urllib3 connections that write a request's head and body in one send.

http.client writes the head of a request, then its body: two syscalls, and on a keep-alive connection to a
local upstream (vLLM, Ollama, a sidecar) two wake-ups of the peer. A chat request is a few kilobytes, so
holding the head until the body is written costs nothing and saves one send per upstream call.
"""

from __future__ import annotations

import select
from typing import Any

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from app.concurrency import original

# The unpatched poll, looked up on first use (nothing here runs at import): a zero-timeout readiness check is one
# syscall, with no switch to gevent's hub.
_poll: Any = None


class _OneWrite:
    """Holds the head `endheaders()` sends until the first body bytes; `request()` flushes what is left."""

    @property
    def is_connected(self) -> bool:
        """urllib3's check before reusing a pooled connection (readable while idle = closed or garbage).

        urllib3 asks the patched `select.poll` with a zero timeout, which under gevent sets up watchers and a
        timer and switches to the hub; the original poll answers the same question in one syscall.
        """
        sock = getattr(self, "sock", None)
        if sock is None:
            return False
        poller = (_poll or _unpatched_poll())()
        poller.register(sock.fileno(), select.POLLIN)
        return not poller.poll(0)

    _hold_next = False
    _held = b""

    def endheaders(self, message_body: Any = None, *, encode_chunked: bool = False) -> None:
        self._hold_next = True
        try:
            super().endheaders(message_body, encode_chunked=encode_chunked)  # type: ignore[misc]
        finally:
            self._hold_next = False

    def send(self, data: Any) -> None:
        if self._hold_next and isinstance(data, bytes):
            self._hold_next = False
            self._held = data
            return
        if self._held:
            data, self._held = self._held + bytes(data), b""
        super().send(data)  # type: ignore[misc]

    def request(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().request(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            self._held = b""  # the request failed before its body: urllib3 discards this connection
            raise
        if self._held:  # no body (GET)
            held, self._held = self._held, b""
            super().send(held)  # type: ignore[misc]


def _unpatched_poll() -> Any:
    global _poll
    _poll = original("select", "poll")
    return _poll


class OneWriteHTTPConnection(_OneWrite, HTTPConnection):
    pass


class OneWriteHTTPSConnection(_OneWrite, HTTPSConnection):
    pass


class OneWriteHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = OneWriteHTTPConnection


class OneWriteHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = OneWriteHTTPSConnection


POOL_CLASSES_BY_SCHEME = {"http": OneWriteHTTPConnectionPool, "https": OneWriteHTTPSConnectionPool}
