"""gunicorn configuration: gevent workers, settings from the environment, JSON logs, metrics hooks.

Only the standard library (and gunicorn's own logger, which the master has loaded anyway) is imported at the
top: the master must not import `ssl` (requests, urllib3, prometheus_client, the app) before forking, or gevent
patches it too late in every worker (MonkeyPatchWarning, unpatched sockets). gunicorn's gevent worker does the
monkey-patching itself.
"""

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gunicorn.glogging import Logger  # already loaded by the master: imports no ssl
from gunicorn.workers.ggevent import GeventWorker  # what worker_class = GatewayGeventWorker loads in the master anyway


class QuietAccessLogger(Logger):
    """gunicorn's logger without its access line: the app writes one richer JSON line per request.

    With `logconfig_dict` set, gunicorn formats every access line (atoms, dates) even when the access
    logger drops it; that was a measurable share of a cached answer's CPU.
    """

    def access(self, resp, req, environ, request_time) -> None:  # noqa: ANN001 - gunicorn's signature
        return


class _HeadWithBodySocket:
    """A client socket that holds the response head until the first body bytes, and sends both in one write.

    gunicorn writes a response's head and its body with two `sendall` calls: two syscalls and two segments for
    the client (or nginx) to wake up for. Nothing waits longer for it: gunicorn only writes the head when the
    first body chunk is ready (a stream's head goes with its first event). Any other use of the socket flushes
    first. (Side by side, the CPU saved was within the noise of this project's machine; fewer packets remain.)
    """

    __slots__ = ("_sock", "_head", "_first")

    def __init__(self, sock) -> None:  # noqa: ANN001 - a gevent socket
        self._sock = sock
        self._head = b""
        self._first = True

    def sendall(self, data: bytes) -> None:
        if self._first:  # gunicorn's first write of a response is always its head
            self._first = False
            if _has_body(data):
                self._head = bytes(data)
                return
        if self._head:
            data, self._head = self._head + data, b""
        self._sock.sendall(data)

    def flush(self) -> None:
        if self._head:
            head, self._head = self._head, b""
            self._sock.sendall(head)

    def __getattr__(self, name: str):  # noqa: ANN204 - whatever the socket has
        self.flush()
        return getattr(self._sock, name)


def _has_body(head: bytes) -> bool:
    """Whether body bytes will follow this head: not after a 1xx (103 Early Hints), 204, 304 or a zero length.

    A head with nothing after it goes out at once rather than after the request's close steps.
    """
    status = head[9:12]
    if status[:1] == b"1" or status in (b"204", b"304"):
        return False
    return b"\r\ncontent-length: 0\r\n" not in head.lower()


class GatewayGeventWorker(GeventWorker):
    """gunicorn's gevent worker, writing each response's head and first body bytes together."""

    def handle_request(self, listener_name, req, sock, addr):  # noqa: ANN001, ANN201 - gunicorn's signature
        if req.method == "HEAD":  # no body will follow the head
            return super().handle_request(listener_name, req, sock, addr)
        wrapped = _HeadWithBodySocket(sock)
        try:
            return super().handle_request(listener_name, req, wrapped, addr)
        finally:
            try:
                wrapped.flush()  # a head whose body turned out empty (an empty iterable)
            except OSError:
                pass  # the client is gone; gunicorn closes the connection


def _load_config_module():  # noqa: ANN202 - app/config.py, loaded by path
    """app/config.py by file path: it is stdlib-only, and importing the `app` package would pull in Flask."""
    path = Path(__file__).resolve().parent / "app" / "config.py"
    spec = importlib.util.spec_from_file_location("gateway_config_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building Settings
    spec.loader.exec_module(module)
    return module


_config = _load_config_module()
_environ = _config.process_environ()  # .env under the environment, exactly as the app reads it


def _int(name: str, default: int) -> int:
    value = _environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        _config.exit_if_invalid()  # names every bad variable at once, not just this one
        raise SystemExit(f"G-AIGateway cannot start: {name}={value!r}: expected an integer") from None


def _logging_config() -> dict:
    """The app's JSON logging config, loaded by file path so that importing it pulls in nothing else."""
    path = Path(__file__).resolve().parent / "app" / "observability" / "logging.py"
    spec = importlib.util.spec_from_file_location("gateway_logging_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.logging_config(_environ.get("LOG_LEVEL", "INFO").strip().upper() or "INFO")


bind = f"0.0.0.0:{_int('PORT', 8080)}"
workers = _int("WEB_CONCURRENCY", 2)
worker_class = GatewayGeventWorker
worker_connections = _int("WORKER_CONNECTIONS", 1000)
graceful_timeout = _int("GRACEFUL_TIMEOUT", 120)
timeout = 30  # heartbeat of an idle gevent worker, not a request timeout: streams may run far longer
# Idle keep-alive connections hold a worker's exit after SIGTERM up to this long, so it stays short (a rollout
# takes seconds, not minutes); it is longer than nginx's upstream keepalive_timeout (8 s) so nginx closes first.
keepalive = 10
preload_app = False  # build clients after the fork, and let the gevent worker patch before any import
accesslog = None  # the app writes one JSON line per request itself
logger_class = QuietAccessLogger
control_socket_disable = True  # one fixed socket path per user would clash between instances; unused here
logconfig_dict = _logging_config()


def on_starting(server) -> None:  # noqa: ANN001 - gunicorn's hook signature
    """Check the settings before forking, and give the workers a clean metrics directory (stale files add up)."""
    _config.exit_if_invalid()
    directory = _environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
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
    return _environ.get("RATE_LIMIT_CONCURRENCY", "").strip() not in ("", "0") or bool(
        _environ.get("GATEWAY_KEYS_FILE", "").strip())


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


def when_ready(server) -> None:  # noqa: ANN001 - gunicorn's hook signature
    if _may_hold_slots():
        _start_releaser(server)
    server.log.info("G-AIGateway listening on %s with %d gevent workers", server.address, server.num_workers)
