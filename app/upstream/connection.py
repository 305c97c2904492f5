"""The one place the gateway reaches under requests' public API into urllib3, for speed (README, "Performance").

Five things, each measured on the proxy's hot path, and pinned by `tests/unit/test_urllib3_seam.py` and
`tests/integration/test_upstream_arrivals.py` (the urllib3 and http.client behaviour they rely on):
- `DirectPools.urlopen`: the upstream call is one `urlopen` on the requests adapter's own urllib3 pool, with the
  adapter's `Retry`, instead of `Session.request` (cookies, hooks, redirects and environment merging the gateway
  never needs cost about as much CPU again as the call itself);
- `_OneWrite.is_connected`: urllib3's check of a pooled connection before reuse, with the unpatched `poll` (one
  syscall; gevent's patched one switched to the hub mid-request: c=32 went from ~85 % to ~96 % of direct);
- `_OneWrite` writes a request's head and body in one send: http.client writes the head, then the body, two
  syscalls, and on a keep-alive connection to a local upstream (vLLM, Ollama, a sidecar) two wake-ups of the peer.
  It is also where each send gets its W3C `traceparent` when tracing is on (app/observability/tracing.py).
- `arrived`: whether an answer's next chunk is already here whole, asked of http.client's buffered reader without
  waiting, so a stream's events that arrived together leave in one write (`UpstreamResult.iter_raw`; side by
  side, streams at c=32 went from 84 to 91 % of direct and c=1 overhead ~0.8 ms lower).
- `http.client.parse_headers` is replaced by `app.upstream.heads.parse_headers`, which builds the same message
  without the email package for a plain head (6 % of a cache-off chat request's instructions, under callgrind).
  It is http.client's own hook for a response head, so it applies to the whole process: it answers the same for
  every head, and falls back to the email parser for any head that is not plain.

`ONE_WRITE`, `DIRECT_URLOPEN` and `PLAIN_HEADS` exist to measure each side by side (a tree with one set False);
all are True.
"""

from __future__ import annotations

import http.client
from typing import Any

import certifi
import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPResponse
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util import Timeout, parse_url
from urllib3.util.retry import Retry

from app.concurrency import readable_now
from app.observability import tracing
from app.upstream import heads

#: Head and body of an upstream request in one send (False: urllib3's own connections, for a side-by-side run).
ONE_WRITE = True
#: The adapter's pool called directly (False: through `Session.request`, for a side-by-side run only: it uses the
#: adapter's whole Retry on every key instead of the share `UpstreamClient` gives each).
DIRECT_URLOPEN = True
#: Response heads parsed by `heads.parse_headers` (False: by http.client's email parser, for a side-by-side run).
PLAIN_HEADS = True
# Certificates verified against the same CA bundle requests itself would use.
_TLS = {"cert_reqs": "CERT_REQUIRED", "ca_certs": certifi.where()}
if PLAIN_HEADS:
    http.client.parse_headers = heads.parse_headers  # read by HTTPResponse.begin at each call


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
        return not readable_now(sock)

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

    def request(self, method: str, url: str, body: Any = None, headers: Any = None, **kwargs: Any) -> None:
        if headers is not None:
            tracing.traceparent(headers)  # each send, urllib3's own retries too, names its own attempt span
        try:
            super().request(method, url, body, headers, **kwargs)  # type: ignore[misc]
        except BaseException:
            self._held = b""  # the request failed before its body: urllib3 discards this connection
            raise
        if self._held:  # no body (GET)
            held, self._held = self._held, b""
            super().send(held)  # type: ignore[misc]


class OneWriteHTTPConnection(_OneWrite, HTTPConnection):
    pass


class OneWriteHTTPSConnection(_OneWrite, HTTPSConnection):
    pass


class OneWriteHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = OneWriteHTTPConnection


class OneWriteHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = OneWriteHTTPSConnection


POOL_CLASSES_BY_SCHEME = {"http": OneWriteHTTPConnectionPool, "https": OneWriteHTTPSConnectionPool}


class OneWriteAdapter(HTTPAdapter):
    """requests' adapter, with pools whose connections send a request's head and body together."""

    def init_poolmanager(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - requests' signature
        super().init_poolmanager(*args, **kwargs)
        if ONE_WRITE:
            self.poolmanager.pool_classes_by_scheme = POOL_CLASSES_BY_SCHEME


class DirectPools:
    """A session's adapter pools, called directly: one `urlopen` per upstream attempt, pools looked up once.

    Keyed by the base URL itself: the backend a key belongs to is defined by where it sends, and names need not
    be unique.
    """

    def __init__(self, session: requests.Session) -> None:
        self._session = session
        self._routes: dict[str, tuple[HTTPConnectionPool, str]] = {}  # base URL -> (its pool, the path it adds)
        if not DIRECT_URLOPEN:
            self.urlopen = self._via_session  # type: ignore[method-assign]

    def retry(self, base_url: str) -> Retry:
        """The Retry the session's adapter was built with, for the caller to share out per attempt."""
        return self._session.get_adapter(base_url).max_retries

    def urlopen(self, method: str, base_url: str, path: str, *, body: bytes | None, headers: dict[str, str],
                retries: Retry, timeout: Timeout) -> HTTPResponse:
        """One request to `base_url` + `path` with `retries`; the body is left unread (streamed by the caller)."""
        route = self._routes.get(base_url)
        if route is None or route[0].pool is None:  # first use, or the pool was closed
            pool = self._session.get_adapter(base_url).poolmanager.connection_from_url(base_url, pool_kwargs=_TLS)
            route = self._routes[base_url] = (pool, parse_url(base_url).path or "")
        pool, prefix = route
        return pool.urlopen(
            method, upstream_url(prefix, path), body=body, headers=headers, retries=retries, timeout=timeout,
            redirect=False, assert_same_host=False, preload_content=False, decode_content=True,
        )

    def _via_session(self, method: str, base_url: str, path: str, *, body: bytes | None,
                     headers: dict[str, str], retries: Retry, timeout: Timeout) -> HTTPResponse:
        response = self._session.request(method, upstream_url(base_url, path), data=body, headers=headers,
                                         timeout=timeout, stream=True, allow_redirects=False)
        return response.raw


def arrived(response: HTTPResponse) -> bool:
    """Whether the answer's next read would not wait: for a chunked answer (read a whole chunk at a time, between
    chunks when asked) its whole next chunk is already here, in the reader's buffer or the socket; otherwise any
    byte is. Asked with a zero timeout on the socket, so it never waits either; when it cannot tell (no socket,
    TLS wanting a record) it says no, and the caller passes on what it has, as it would anyway.
    """
    reader = getattr(getattr(response, "_fp", None), "fp", None)  # http.client's buffered reader, None once read
    sock = getattr(getattr(response, "_connection", None), "sock", None)
    if reader is None or sock is None:
        return False
    timeout = sock.gettimeout()
    sock.settimeout(0.0)  # the socket's read raises EWOULDBLOCK, which the reader turns into "nothing yet"
    try:
        ahead = reader.peek(1)  # what the buffer holds (after one read of what the socket has, if it was empty)
    except (OSError, ValueError):
        return False
    finally:
        sock.settimeout(timeout)
    return bool(ahead) and (not response.chunked or _whole_chunk(ahead))


def _whole_chunk(ahead: bytes) -> bool:
    """Whether `ahead`, read from a chunk boundary, holds the whole next chunk (size line, data, CRLF) or, for the
    last one, everything through the blank line that ends the body: reading it cannot wait for the upstream."""
    line_end = ahead.find(b"\r\n")
    if line_end < 0:
        return False
    try:
        size = int(ahead[:line_end].split(b";", 1)[0], 16)
    except ValueError:
        return True  # a malformed size line fails the read at once: nothing to wait for
    if size == 0:
        return ahead.find(b"\r\n\r\n", line_end) >= 0
    return len(ahead) >= line_end + 2 + size + 2


def upstream_url(base_url: str, path: str) -> str:
    """`TARGET_URL` + `/v1/...`, without doubling a `/v1` the base URL already ends with."""
    if base_url.endswith("/v1") and path.startswith("/v1/"):
        path = path[3:]
    return base_url + path
