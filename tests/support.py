"""Real processes for the tests: the mock upstream and the gateway under gunicorn, on loopback ports.

The only fake in the suite is the upstream, and it is a real HTTP server in its own process.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
GUNICORN = str(Path(sys.executable).parent / "gunicorn")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


# The markers of the test pytest is running (tests/conftest.py sets them; None outside pytest, as in tools/).
running_markers: frozenset[str] | None = None


def declared(marker: str, what: str) -> None:
    """A helper about to start `what` checks the running test says so, so `pytest -m` can select on markers."""
    if running_markers is not None and marker not in running_markers:
        raise AssertionError(f"a test that uses {what} must be marked @pytest.mark.{marker} (pyproject.toml markers)")


def missing_tool(reason: str) -> None:
    """A system tool a test needs is absent: skip on a developer's machine, fail in CI.

    `.ci/run` installs every tool and sets GATEWAY_TESTS_STRICT=1, so there a skip would only hide a broken
    install step behind a green run.
    """
    import pytest

    if os.environ.get("GATEWAY_TESTS_STRICT") == "1":
        pytest.fail(f"{reason} (GATEWAY_TESTS_STRICT=1: CI must have every tool)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ClosedPort:
    """A loopback port that refuses connections: bound but never listening, and held so no process takes it.

    `free_port()` only promises the port was free a moment ago; a test that needs "nothing answers here"
    must keep it that way while the gateway dials it.
    """

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._sock.close()


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s")


class MockUpstream:
    """tools/mock_upstream.py in a subprocess; faults and the request log through its /_mock/ API."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [PYTHON, str(ROOT / "tools" / "mock_upstream.py"), "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # nothing reads them: a pipe could fill up
        )
        wait_until(lambda: requests.get(self.url + "/_mock/config", timeout=1).ok, 15, "mock upstream")

    def faults(self, *faults: dict[str, Any]) -> None:
        requests.post(self.url + "/_mock/faults", json={"faults": list(faults)}, timeout=5).raise_for_status()

    def configure(self, **config: float) -> None:
        requests.post(self.url + "/_mock/config", json=config, timeout=5).raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        return requests.get(self.url + "/_mock/requests", timeout=5).json()["requests"]

    def reset(self) -> None:
        requests.post(self.url + "/_mock/reset", timeout=5).raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()


class OtlpReceiver:
    """An OTLP/HTTP traces receiver in a thread of this process: decodes each export (protobuf, as the gateway's
    exporter sends it) with opentelemetry-proto and keeps the spans, flattened to dicts.

    Each span: name, kind (SERVER, CLIENT, INTERNAL), trace_id, span_id, parent_id (hex, "" for a root),
    attributes (plain values; arrays as lists), status ("UNSET", "OK", "ERROR"), resource (its attributes).
    `keep=False` only counts them (a sink for benchmarks).
    """

    def __init__(self, *, keep: bool = True) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        receiver = self
        self.keep = keep
        self.spans: list[dict[str, Any]] = []
        self.count = 0
        self.exports = 0
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    import gzip

                    body = gzip.decompress(body)
                receiver._received(self.path, body)
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _received(self, path: str, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        spans = []
        for resource_spans in request.resource_spans:
            resource = _otlp_attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append({
                        "name": span.name, "kind": _SPAN_KINDS.get(span.kind, str(span.kind)),
                        "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                        "parent_id": span.parent_span_id.hex(), "attributes": _otlp_attributes(span.attributes),
                        "status": ("UNSET", "OK", "ERROR")[span.status.code], "resource": resource,
                        "scope": scope_spans.scope.name, "path": path,
                        "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                    })
        with self._lock:
            self.exports += 1
            self.count += len(spans)
            if self.keep:
                self.spans.extend(spans)

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [span for span in self.spans if span["trace_id"] == trace_id]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


_SPAN_KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def _otlp_attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _otlp_value(pair.value) for pair in pairs}


def _otlp_value(value: Any) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_otlp_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _otlp_attributes(value.kvlist_value.values)
    return getattr(value, which) if which else None


def worker_pids(master: int) -> list[int]:
    """The gunicorn workers: processes whose parent (field 4 of /proc/<pid>/stat) is the master, except its
    slot releaser (`python -m app.ratelimit.reap`, running when a concurrency limit is configured)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
            if ppid == master:
                with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                    releaser = b"app.ratelimit.reap" in fh.read()
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        if ppid == master and not releaser:
            pids.append(int(entry.name))
    return sorted(pids)


class Gateway:
    """gunicorn -c gunicorn.conf.py wsgi:app with gevent workers, bound to a loopback port.

    stderr (gunicorn's and the app's JSON log lines) goes to a file the tests can read.
    """

    def __init__(self, env: dict[str, str], *, workers: int = 1, timeout: float = 60, root: Path = ROOT,
                 wrapper: Sequence[str] = ()) -> None:
        """`root`: the checkout to run (another one only for tools/bench.py's side-by-side runs). `wrapper`: a command
        gunicorn runs under (tools/bench_instructions.py's valgrind)."""
        declared("gunicorn", "a gateway under gunicorn")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"  # /metrics has a port of its own
        self.workdir = Path(tempfile.mkdtemp(prefix="gateway-test-"))
        self.log_path = self.workdir / "gunicorn.log"
        self.metrics_dir = self.workdir / "metrics"
        full_env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"),
            "PYTHONUNBUFFERED": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "REDIS_URL": REDIS_URL,
            "WEB_CONCURRENCY": str(workers),
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
            "GRACEFUL_TIMEOUT": "10",
            "METRICS_PORT": str(self.metrics_port),
            **env,
        }
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [*wrapper, GUNICORN, "-c", str(root / "gunicorn.conf.py"), "-b", f"127.0.0.1:{self.port}",
             "-b", f"127.0.0.1:{self.metrics_port}", "wsgi:app"],
            cwd=root, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        try:
            wait_until(self._ready, timeout, f"gateway (log: {self.log_path})")
        except TimeoutError:
            self.stop()
            raise TimeoutError(f"gateway did not start; its log:\n{self.logs()}") from None

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise TimeoutError(f"gunicorn exited with {self.process.returncode}")
        return requests.get(self.url + "/healthz", timeout=1).ok

    def logs(self) -> str:
        if not self._log.closed:  # still readable after stop(), for assertions on the whole run
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON lines of the log (gunicorn's and the app's), parsed."""
        import json

        lines = []
        for line in self.logs().splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        return lines

    def request_lines(self) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("message") == "request"]

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self) -> None:
        # Finished `requests` responses caught in reference cycles keep keep-alive connections open, and an open
        # idle connection holds gunicorn's graceful exit: collect them first.
        gc.collect()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def load_gunicorn_conf(name: str) -> Any:
    """gunicorn.conf.py as a module, for unit tests of its worker parts (it imports the standard library only)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "gunicorn.conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def openai_error(response: requests.Response, status: int | None = None) -> dict[str, Any]:
    """The `error` object of an OpenAI-style error answer, after checking its shape (and status, if given)."""
    if status is not None:
        assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert "Traceback" not in response.text and 'File "' not in response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert "code" in error and (error["code"] is None or isinstance(error["code"], str))
    return error


class RedisServer:
    """A memory-only redis-server of a test's own on a loopback port: one it may wipe, kill and start again."""

    def __init__(self, *extra_args: str, debug: bool = False) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.extra_args = extra_args
        self.debug = debug  # allow DEBUG SLEEP (a slow Redis) from loopback clients
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        declared("redis", "a redis-server")
        options = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--daemonize", "no", *self.extra_args]
        if self.debug and _redis_major() >= 7:  # Redis 7 refuses DEBUG unless enabled; older ones lack the option
            options += ["--enable-debug-command", "local"]
        self.process = subprocess.Popen(["redis-server", *options], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_until(self._answers, 10, f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def _redis_major() -> int:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=True).stdout
    version = out.split("v=", 1)[1].split()[0] if "v=" in out else "0"
    return int(version.split(".")[0])


@contextmanager
def gateway_pair(env: dict[str, str]) -> Iterator[tuple[Gateway, Gateway]]:
    """Two gateway processes on the same Redis: "another worker" for certain, and another pod as well."""
    first = Gateway(env)
    try:
        second = Gateway(env)
    except BaseException:
        first.stop()
        raise
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


def base_env(upstream: MockUpstream, **extra: str) -> dict[str, str]:
    """A gateway pointed at the mock with one upstream key, auth off unless the test turns it on."""
    return {
        "TARGET_URL": upstream.url,
        # A key of its own: cooldowns are shared through Redis, so one test's 429s never rest another's key.
        "UPSTREAM_API_KEYS": f"sk-upstream-test-{uuid.uuid4().hex[:12]}",
        "AUTH_DISABLED": "true",
        "UPSTREAM_BACKOFF_FACTOR": "0.05",
        "SEMANTIC_CACHE_ENABLED": "false",
        **extra,
    }
