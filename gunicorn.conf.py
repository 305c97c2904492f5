"""gunicorn configuration: gevent workers, settings from the environment, JSON logs, metrics hooks.

Only the standard library, gunicorn's own logger (which the master has loaded anyway) and the app's settings and
logging config (standard library only, as is `app/__init__.py`) are imported at the top: the master must not import
`ssl` (requests, urllib3, prometheus_client, the app's services) before forking, or gevent patches it too late in
every worker (MonkeyPatchWarning, unpatched sockets). gunicorn's gevent worker does the monkey-patching itself.
This file only maps the settings (app/config.py) to gunicorn's names. gunicorn puts its working directory on
`sys.path` before reading it: start it from the project root (the Dockerfile, `make run` and the tests do).
"""

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gunicorn.glogging import Logger  # already loaded by the master: imports no ssl
from gunicorn.workers.ggevent import GeventWorker  # what worker_class = GatewayGeventWorker loads in the master anyway

from app.config import ConfigError, Settings
from app.observability.logging import logging_config

# One BLAS thread per worker (the one place this is set for the gateway: the Dockerfile, `make run` and the k8s
# manifests all start gunicorn with this file): the workers import numpy after the fork, with the master's
# environment, and a thread per core in every gevent worker would only contend for the cores the workers share.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


class QuietAccessLogger(Logger):
    """gunicorn's logger without its access line: the app writes one richer JSON line per request.

    With `logconfig_dict` set, gunicorn formats every access line (atoms, dates) even when the access
    logger drops it; that was a measurable share of a cached answer's CPU.
    """

    def access(self, resp, req, environ, request_time) -> None:  # noqa: ANN001 - gunicorn's signature
        return


class RequestReadTimeout(Exception):
    """A request head not read in time (REQUEST_HEADER_TIMEOUT or REQUEST_IDLE_TIMEOUT): answered 408.

    Not an OSError on purpose: gunicorn's `handle` passes other exceptions to `handle_error`, which answers them,
    while it logs socket errors with a trace and answers nothing.
    """


class _KeepAliveExpired(Exception):
    """No byte of a next request within `keepalive` seconds: the connection closes without an answer."""


_WAITING, _HEAD, _BODY = 0, 1, 2


class _Crowd:
    """How many connections this worker holds, and from how many on it counts as crowded."""

    __slots__ = ("open", "crowded_at")

    def __init__(self, worker_connections: int) -> None:
        self.open = 0
        self.crowded_at = max(1, int(worker_connections * CROWDED_SHARE))

    @property
    def crowded(self) -> bool:
        return self.open >= self.crowded_at


# A worker holding CROWDED_SHARE of WORKER_CONNECTIONS is under a connection flood (slowloris heads, idle
# keep-alives): then a connection waiting for its next request gets CROWDED_WAIT seconds and a request head
# CROWDED_HEAD seconds from its first byte, so held connections turn over and new clients find a free slot.
# A real client sends its head in one packet; a keep-alive connection is cheap to open again.
CROWDED_SHARE = 0.5
CROWDED_WAIT = 1.0
CROWDED_HEAD = 2.0
WAIT_SLICE = 1.0  # a waiting read wakes up this often to notice the worker became crowded


class _ReadDeadlineSocket:
    """The client socket with bounded reads: no read waits longer than the idle timeout, nor past its phase's
    allowance.

    Phases: waiting for a request (up to `keepalive` seconds, then closed quietly), reading its head (from the
    first byte: REQUEST_HEADER_TIMEOUT in all, else 408 from the worker) and reading its body (from the end of the
    head: REQUEST_BODY_TIMEOUT in all; a read past it raises `socket.timeout`, which the app answers with 408).
    While the worker is crowded the first two are short (CROWDED_WAIT, CROWDED_HEAD). Writes are not bounded: a
    client reading a long stream slowly is not cut.

    One write is held back: gunicorn sends a response's head and its body with two `sendall` calls, so a response
    whose body has a declared length keeps its head here until that body's first bytes, and both leave in one
    send (one syscall, one segment and one wake-up for the client or proxy; side by side on this project's
    machine about 0.15 ms less CPU per request at c=32 and 0.15 ms less overhead at c=1). A head without a
    sized body (a stream, which must leave at once, a 1xx, 204 or 304, a zero length) is sent as it comes, and
    any other use of the socket sends a held head first.
    """

    __slots__ = ("_sock", "_limits", "_crowd", "_phase", "_since", "_last", "_head", "_head_next")

    def __init__(self, sock, limits: dict[str, float], crowd: _Crowd) -> None:  # noqa: ANN001 - a gevent socket
        self._sock = sock
        self._limits = limits
        self._crowd = crowd
        self._head = b""  # a response head waiting for its body's first bytes
        self._head_next = False  # the next write is a response's head
        self.wait_for_request()

    def expect_response(self, has_body: bool) -> None:
        """A request is being answered: its first write is the response head (`has_body`: not a HEAD request)."""
        self._head_next = has_body

    def sendall(self, data: bytes) -> None:
        if self._head_next:
            self._head_next = False
            if _sized_body(data):
                self._head = bytes(data)
                return
        head, self._head = self._head, b""
        if head and len(data) <= _JOIN_MAX_BYTES:
            data = head + data
        elif head:
            self._sock.sendall(head)  # a large body is not copied to save one send
        self._sock.sendall(data)

    def flush(self) -> None:
        """Send a held head now (its body turned out empty, or the socket is used another way)."""
        head, self._head = self._head, b""
        if head:
            self._sock.sendall(head)

    def wait_for_request(self) -> None:
        self._phase = _WAITING
        self._since = self._last = time.monotonic()

    def read_body(self) -> None:
        self._phase = _BODY
        self._since = self._last = time.monotonic()

    def _allowance(self) -> float:
        limits, phase = self._limits, self._phase
        if phase == _BODY:
            return limits["body"]
        crowded = self._crowd.crowded
        if phase == _WAITING:
            return min(limits["keepalive"], CROWDED_WAIT) if crowded else limits["keepalive"]
        return min(limits["head"], CROWDED_HEAD) if crowded else limits["head"]

    def recv(self, size: int) -> bytes:
        sock = self._sock
        while True:
            phase = self._phase
            end = self._since + self._allowance()
            if phase != _WAITING:
                end = min(end, self._last + self._limits["idle"])
            left = end - time.monotonic()
            if left <= 0:
                raise self._timeout()
            wait = left if phase == _BODY else min(left, WAIT_SLICE)
            sock.settimeout(wait)
            try:
                data = sock.recv(size)
            except TimeoutError:
                continue  # the loop decides whether the allowance is spent
            finally:
                sock.settimeout(None)
            now = time.monotonic()
            self._last = now
            if phase == _WAITING and data:
                self._phase, self._since = _HEAD, now
            return data

    def _timeout(self) -> Exception:
        if self._phase == _WAITING:
            return _KeepAliveExpired()
        if self._phase == _HEAD:
            return RequestReadTimeout("the request head was not received in time")
        return TimeoutError("the request body was not received in time")

    def __getattr__(self, name: str):  # noqa: ANN204 - whatever the socket has
        self.flush()
        return getattr(self._sock, name)


#: A held head and a body up to this size leave in one send; a larger body follows its head in a send of its own.
_JOIN_MAX_BYTES = 64 * 1024


def _sized_body(head: bytes) -> bool:
    """Whether this response head announces body bytes of a declared length (they follow in the same write call
    of gunicorn's): not a 1xx, 204 or 304, and a Content-Length above zero. Chunked answers (streams) say no."""
    if not head.startswith(b"HTTP/") or head[9:10] == b"1" or head[9:12] in (b"204", b"304"):
        return False
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        return False
    end = lower.find(b"\r\n", at + 2)
    value = lower[at + 17:end].strip()
    return value.isdigit() and int(value) > 0


class GatewayGeventWorker(GeventWorker):
    """gunicorn's gevent worker with bounded request reads and OpenAI-style errors of its own."""

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = _CloseUnreadBody(self.wsgi)
        self.crowd = _Crowd(self.worker_connections)

    def handle_quit(self, sig, frame) -> None:  # noqa: ANN001 - gunicorn's signature
        """Quit once. Ctrl-C in a terminal reaches the workers twice (the terminal's SIGINT to the whole process
        group, then the master's SIGQUIT); gunicorn's handler run a second time, while the worker is already
        exiting, ends in a SystemExit traceback on the console although the shutdown went well."""
        if getattr(self, "_quitting", False):
            return
        self._quitting = True
        super().handle_quit(sig, frame)

    def timeout_ctx(self):  # noqa: ANN201 - gunicorn's signature
        return contextlib.nullcontext()  # the socket bounds the wait for a request itself (_ReadDeadlineSocket)

    def handle(self, listener, client, addr):  # noqa: ANN001, ANN201 - gunicorn's signature
        crowd = self.crowd
        crowd.open += 1
        try:
            return super().handle(listener, _ReadDeadlineSocket(client, _READ_LIMITS, crowd), addr)
        finally:
            crowd.open -= 1

    def handle_request(self, listener_name, req, sock, addr):  # noqa: ANN001, ANN201 - gunicorn's signature
        reader = getattr(req.body, "reader", None)
        if hasattr(reader, "parse_chunk_size"):
            reader.parse_chunk_size = _bounded_chunk_size(reader.parse_chunk_size, _READ_LIMITS["max_body"])
        if isinstance(sock, _ReadDeadlineSocket):
            sock.read_body()
            sock.expect_response(req.method != "HEAD")
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            if isinstance(sock, _ReadDeadlineSocket):
                sock.expect_response(False)  # an error page gunicorn writes after this goes out as it is
                try:
                    sock.flush()
                except OSError:
                    pass  # the client is gone; gunicorn closes the connection
                sock.wait_for_request()

    def handle_error(self, req, client, addr, exc):  # noqa: ANN001, ANN201 - gunicorn's signature
        """gunicorn's own refusals (408, 414, 431, 400, ...) as OpenAI-style JSON instead of its HTML page."""
        if isinstance(exc, _KeepAliveExpired):
            return  # an idle connection: closed without a word, as gunicorn does
        answer = refusal(exc)
        if answer is None:
            self.log.exception("Error handling request", exc_info=exc)
            answer = (500, "Internal Server Error", "server_error", "internal_error",
                      "The gateway failed to handle this request.")
        else:
            self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], type(exc).__name__)
        try:
            client.sendall(error_response(*answer))
        except OSError:
            self.log.debug("Failed to send error message.")


def _bounded_chunk_size(parse, limit: int):  # noqa: ANN001, ANN202 - gunicorn's ChunkedReader method
    """A chunk declaring more bytes than MAX_BODY_BYTES is refused at once (400), not waited for."""

    def parse_chunk_size(unreader, data=None):  # noqa: ANN001, ANN202
        size, rest = parse(unreader, data)
        if size > limit:
            from gunicorn.http.errors import InvalidChunkSize  # in the worker, after gevent patched ssl

            raise InvalidChunkSize(b"chunk size over MAX_BODY_BYTES")
        return size, rest

    return parse_chunk_size


# gunicorn's own refusals (raised while it parses a request, before the app sees it), by exception class name:
# status, reason phrase, OpenAI-style code and message. Names, not classes: importing gunicorn.http here would
# import `ssl` into the master (see the module docstring). Anything else a client sent wrong is a 400.
_GUNICORN_REFUSALS = {
    "RequestReadTimeout": (408, "Request Timeout", "request_timeout",
                           "The request was not received in time (REQUEST_HEADER_TIMEOUT, REQUEST_IDLE_TIMEOUT)."),
    "LimitRequestLine": (414, "URI Too Long", "uri_too_long", "The request line is longer than the gateway accepts."),
    "LimitRequestHeaders": (431, "Request Header Fields Too Large", "request_headers_too_large",
                            "The request headers are larger or more numerous than the gateway accepts."),
    "UnsupportedTransferCoding": (501, "Not Implemented", "unsupported_transfer_coding",
                                  "The request's Transfer-Encoding is not supported (use chunked or none)."),
    "ExpectationFailed": (417, "Expectation Failed", "expectation_failed",
                          "The request's Expect header cannot be met (only 100-continue is)."),
    "ForbiddenProxyRequest": (403, "Forbidden", "forbidden", "The proxy header was sent from an untrusted address."),
}
_CLIENT_ERRORS = frozenset({
    "InvalidRequestLine", "InvalidRequestMethod", "InvalidHTTPVersion", "InvalidHeader", "InvalidHeaderName",
    "InvalidProxyLine", "InvalidProxyHeader", "InvalidSchemeHeaders", "ObsoleteFolding", "InvalidH2CPreface",
    "InvalidChunkSize", "ChunkMissingTerminator", "InvalidChunkExtension", "SSLError",
})


def error_response(status: int, reason: str, error_type: str, code: str | None, message: str) -> bytes:
    """A complete HTTP/1.1 answer carrying an OpenAI-style error, closing the connection."""
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


def refusal(exc: BaseException) -> tuple[int, str, str, str | None, str] | None:
    """What gunicorn's own error becomes: (status, reason, type, code, message); None for an app failure."""
    name = type(exc).__name__
    if name in _GUNICORN_REFUSALS:
        status, reason, code, message = _GUNICORN_REFUSALS[name]
        return status, reason, "invalid_request_error", code, message
    if name in _CLIENT_ERRORS or any(cls.__name__ in _CLIENT_ERRORS for cls in type(exc).__mro__):
        return 400, "Bad Request", "invalid_request_error", "bad_request", "The request is not valid HTTP/1.1."
    return None


def _body_unread(body) -> bool:  # noqa: ANN001 - gunicorn's Body
    """Whether the app left part of the request body unread (or reading it failed): the connection must close,
    since draining it would let a client hold the worker with a body that never ends.

    Duck-typed on gunicorn's readers (LengthReader.length, ChunkedReader.parser): importing their classes would
    import `ssl` into the master.
    """
    if body is None:
        return False
    if getattr(body, "failed", False) is True:
        return True
    buf = getattr(body, "buf", None)
    if buf is not None and buf.tell() > 0:
        return True
    reader = getattr(body, "reader", None)
    if getattr(reader, "length", 0):
        return True
    return getattr(reader, "parser", None) is not None


class _CloseUnreadBody:
    """WSGI middleware: an answer given without reading the whole request body (a 401, a 429, a 408) says
    `Connection: close`, and gunicorn closes the connection instead of draining the rest."""

    def __init__(self, app) -> None:  # noqa: ANN001 - a WSGI app
        self.app = app

    def __call__(self, environ: dict, start_response):  # noqa: ANN204 - WSGI
        def start(status, headers, exc_info=None):  # noqa: ANN001, ANN202 - WSGI
            if _body_unread(environ.get("wsgi.input")):
                force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
                if force_close is not None:  # gunicorn's Response: sends `Connection: close`, then closes
                    force_close()
            return start_response(status, headers, exc_info)

        return self.app(environ, start)


def _settings() -> Settings:
    """The gateway's settings, read as the app reads them (`.env` under the environment); a bad one stops here."""
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise SystemExit(f"G-AIGateway cannot start: {exc}") from None


settings = _settings()


bind = [f"0.0.0.0:{settings.port}", f"0.0.0.0:{settings.metrics_port}"]
workers = settings.web_concurrency
worker_class = GatewayGeventWorker
worker_connections = settings.worker_connections
graceful_timeout = settings.graceful_timeout
timeout = 30  # heartbeat of an idle gevent worker, not a request timeout: streams may run far longer
# Idle keep-alive connections hold a worker's exit after SIGTERM up to this long, so it stays short (a rollout
# takes seconds, not minutes); it is longer than nginx's upstream keepalive_timeout (8 s) so nginx closes first.
keepalive = 10
# Reading a request is bounded (see _ReadDeadlineSocket): a slow client can hold a connection only this long.
_READ_LIMITS = {
    "keepalive": float(keepalive),
    "head": settings.request_header_timeout,
    "body": settings.request_body_timeout,
    "idle": settings.request_idle_timeout,
    "max_body": settings.max_body_bytes,
}
preload_app = False  # build clients after the fork, and let the gevent worker patch before any import
accesslog = None  # the app writes one JSON line per request itself
logger_class = QuietAccessLogger
control_socket_disable = True  # one fixed socket path per user would clash between instances; unused here
logconfig_dict = logging_config(settings.log_level)


def on_starting(server) -> None:  # noqa: ANN001 - gunicorn's hook signature
    """Give the workers a clean metrics directory (stale files add up); the settings were checked on loading this."""
    directory = settings.prometheus_multiproc_dir
    if not directory:
        directory = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # prometheus_client in the workers reads os.environ
    os.makedirs(directory, exist_ok=True)
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.remove(entry.path)
    server.log.info("prometheus multiprocess directory: %s", directory)


def _may_hold_slots() -> bool:
    """Whether any tenant can have a concurrency limit (the default one, or one from the keys file)."""
    return settings.rate_limit_concurrency > 0 or settings.gateway_keys_file is not None


def child_exit(server, worker) -> None:  # noqa: ANN001 - gunicorn's hook signature
    """A worker is gone: release the concurrency slots it held, and mark it dead for the metrics."""
    if _may_hold_slots():
        _release_slots(server, worker.pid)
    _mark_process_dead(worker.pid)


_releaser: "subprocess.Popen[str] | None" = None


def _start_releaser(server) -> None:  # noqa: ANN001 - gunicorn's arbiter
    """Start the process that releases dead workers' slots (`app/ratelimit/reap.py --serve`), if not running.

    A process of its own: redis-py would import `ssl` into the master (see `_mark_process_dead`). It is
    started ahead, so a worker's death costs no interpreter start; it ends when the master does (its stdin
    closes), and the master's SIGCHLD handling reaps it like any other child if it ends before.
    """
    global _releaser
    if _releaser is not None and _releaser.poll() is None:
        return
    try:
        _releaser = subprocess.Popen([sys.executable, "-m", "app.ratelimit.reap", "--serve"],
                                     cwd=Path(__file__).resolve().parent, stdin=subprocess.PIPE, text=True)
    except OSError as exc:
        _releaser = None
        server.log.error("could not start the release of dead workers' concurrency slots: %s", exc)


def _release_slots(server, pid: int) -> None:  # noqa: ANN001 - gunicorn's arbiter
    """Release a dead worker's concurrency slots now, not after their lease: hand its pid to the releaser."""
    _start_releaser(server)
    if _releaser is None or _releaser.stdin is None:
        return
    try:
        _releaser.stdin.write(f"{pid}\n")
        _releaser.stdin.flush()
    except OSError as exc:  # it died since: the slots wait for their lease
        server.log.error("could not hand worker %s's concurrency slots to the releaser: %s", pid, exc)


def _mark_process_dead(pid: int) -> None:
    """prometheus_client's `multiprocess.mark_process_dead(pid)`, done with the standard library.

    Importing prometheus_client here would import `ssl` into the master, and every worker forked after
    a crash would inherit it unpatched; the library function only removes the dead worker's live-gauge
    files, which is what this does.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    for mode in ("liveall", "livesum", "livemax", "livemin", "livemostrecent"):
        for path in glob.glob(os.path.join(directory, f"gauge_{mode}_{pid}.db")):
            os.remove(path)


def post_worker_init(worker) -> None:  # noqa: ANN001 - gunicorn's hook signature
    """Move everything loaded so far (the app, its libraries) out of the garbage collector's sight.

    A full collection otherwise walks every object of Flask, numpy, onnxruntime and the model's tokenizer
    from time to time, in the middle of some request; frozen objects are never traversed (gc.freeze).
    """
    import gc

    gc.collect()  # start-up garbage first, or freezing would keep it for good
    gc.freeze()


def worker_exit(server, worker) -> None:  # noqa: ANN001 - gunicorn's hook signature
    """In the worker, as it exits: export the spans still queued (tracing is set up per worker by `create_app`).

    Imported here, in the worker, never in the master (see the module docstring).
    """
    tracing = sys.modules.get("app.observability.tracing")
    if tracing is not None:
        tracing.shutdown()


def when_ready(server) -> None:  # noqa: ANN001 - gunicorn's hook signature
    if _may_hold_slots():
        _start_releaser(server)
    server.log.info("G-AIGateway listening on %s with %d gevent workers", server.address, server.num_workers)
