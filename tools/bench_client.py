if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

# A cheap HTTP/1.1 keep-alive load generator for tools/bench.py, and the parser it uses.
#
# On two shared cores the client's own CPU is part of every number, so it is kept small: raw sockets with
# TCP_NODELAY, request bytes encoded once, one greenlet per connection, and a response parser that only counts
# Content-Length bodies and walks chunk sizes (SSE streams are read to the terminating chunk).
#
# Run as a process (`python tools/bench_client.py`), it reads one JSON phase per stdin line and writes one JSON
# result per stdout line; LoadGenerator drives it from the benchmark. Only that process is monkey-patched.


import json
import os
import select
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEAD_END = b"\r\n\r\n"
CRLF = b"\r\n"
RECV_BYTES = 65536
SOCKET_TIMEOUT = 30.0
_LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _UNTIL_CLOSE, _DONE = range(6)


class ParseError(Exception):
    """The peer sent something that is not an HTTP/1.1 response."""


@dataclass
class ResponseParser:
    """Incremental HTTP/1.1 response parser: feed() bytes until it returns True.

    It keeps the status, the headers (lower-cased names) and, only if asked, the body; bytes after the end of
    the response (none without pipelining) are left in `rest`.
    """

    keep_body: bool = False
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    close: bool = False
    rest: bytes = b""
    _buf: bytearray = field(default_factory=bytearray)
    _state: int = -1
    _remaining: int = 0

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> bool:
        """Consume `data`; True once the whole response (head and body) has arrived."""
        if self._state == _DONE:
            self.rest += data
            return True
        if self._state == _LENGTH and not self.keep_body and len(data) < self._remaining:
            self._remaining -= len(data)  # the common case: count the bytes, copy nothing
            return False
        self._buf += data
        if self._state == -1:
            end = self._buf.find(HEAD_END)
            if end < 0:
                return False
            self._head(bytes(self._buf[:end]))
            del self._buf[: end + 4]
        return self._body()

    def finish(self) -> bool:
        """The peer closed the connection: complete only if the body runs until close."""
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
        return self._state == _DONE

    def _head(self, head: bytes) -> None:
        lines = head.split(CRLF)
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ParseError(f"bad status line {lines[0][:80]!r}")
        self.status = int(parts[1])
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                self.headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        connection = self.headers.get("connection", "").lower()
        self.close = connection == "close" or (parts[0] == b"HTTP/1.0" and connection != "keep-alive")
        if self.status < 200 or self.status in (204, 304):
            self._state = _DONE
        elif "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._state = _CHUNK_SIZE
        elif "content-length" in self.headers:
            self._state = _LENGTH
            self._remaining = int(self.headers["content-length"])
        else:
            self._state = _UNTIL_CLOSE
            self.close = True

    def _body(self) -> bool:
        buf = self._buf
        while True:
            state = self._state
            if state == _LENGTH:
                take = min(len(buf), self._remaining)
                if self.keep_body:
                    self.body += buf[:take]
                self._remaining -= take
                del buf[:take]
                if self._remaining:
                    return False
                self._state = _DONE
            elif state == _CHUNK_SIZE:
                end = buf.find(CRLF)
                if end < 0:
                    return False
                try:
                    size = int(bytes(buf[:end]).split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ParseError(f"bad chunk size {bytes(buf[:end])[:40]!r}") from None
                del buf[: end + 2]
                self._remaining = size
                self._state = _CHUNK_DATA if size else _TRAILER
            elif state == _CHUNK_DATA:
                if len(buf) < self._remaining + 2:
                    return False
                if self.keep_body:
                    self.body += buf[: self._remaining]
                del buf[: self._remaining + 2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                end = buf.find(CRLF)
                if end < 0:
                    return False
                del buf[: end + 2]
                if end == 0:  # the empty line after the last chunk (and any trailers)
                    self._state = _DONE
            elif state == _UNTIL_CLOSE:
                if self.keep_body:
                    self.body += buf
                buf.clear()
                return False
            else:  # _DONE
                self.rest = bytes(buf)
                buf.clear()
                return True


def sse_data(body: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, in order (one string per event; multi-line data joined by \\n)."""
    events = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
        if lines:
            events.append(b"\n".join(lines).decode("utf-8", "replace"))
    return events


def encode_request(method: str, path: str, host: str, headers: dict[str, str], body: bytes) -> bytes:
    """One request's bytes, written with a single sendall (one segment with TCP_NODELAY)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ---------------------------------------------------------------------------------------------------------------
# The load-generator process (gevent).


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime of these processes, in clock ticks, from /proc/<pid>/stat (a gone process counts 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted after "pid (comm)"
    return total


class _Phase:
    """One measured phase: `concurrency` keep-alive connections sending until `count` or `seconds` runs out."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.host: str = spec["host"]
        self.port: int = int(spec["port"])
        self.concurrency = int(spec["concurrency"])
        self.count = int(spec.get("count") or 10**9)
        self.seconds = float(spec.get("seconds") or 3600)
        self.start = int(spec.get("start", 0))
        self.warmup = int(spec.get("warmup", 1))
        self.stream = bool(spec.get("stream", False))
        self.header = spec.get("header", "x-cache-layer")
        self.cpu_pids = [int(p) for p in spec.get("cpu_pids", [])]
        request = spec["request"]
        head_host = f"{self.host}:{self.port}"
        headers = {"Content-Type": "application/json", **request.get("headers", {})}
        # A body template, or a list of them used in turn (index i takes templates[i % len]).
        body = request["body"]
        self._templates: list[str] = body if isinstance(body, list) else [body]
        self._varies = any("{n}" in t for t in self._templates)
        self._encode = lambda text: encode_request(request.get("method", "POST"), request["path"], head_host,
                                                   headers, text.encode())
        self._fixed = self._encode(self._templates[0])
        self._warm_tag = uuid.uuid4().hex[:12]
        self.next_index = 0
        self.latencies: list[float] = []
        self.tags: list[str] = []
        self.statuses: dict[str, int] = {}
        self.errors: list[str] = []

    def payload(self, index: int) -> bytes:
        """The request for `index` ({n} = start + index); negative indexes are unique warm-up requests."""
        if not self._varies:
            return self._fixed
        n = f"w{self._warm_tag}{-index}" if index < 0 else str(self.start + index)
        return self._encode(self._templates[index % len(self._templates)].replace("{n}", n))

    def connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=SOCKET_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def exchange(self, sock: socket.socket, payload: bytes) -> tuple[ResponseParser, float]:
        """Send one request and read its whole response; the latency is send -> last byte."""
        parser = ResponseParser(keep_body=self.stream)
        started = time.perf_counter()
        sock.sendall(payload)
        while True:
            data = sock.recv(RECV_BYTES)
            if not data:
                if parser.finish():
                    break
                raise ParseError("connection closed mid-response")
            if parser.feed(data):
                break
        elapsed = time.perf_counter() - started
        if self.stream and parser.status == 200 and not parser.body.rstrip().endswith(b"data: [DONE]"):
            raise ParseError("stream ended without data: [DONE]")
        return parser, elapsed


def run_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """Warm every connection up, then measure; the CPU of `cpu_pids` is read at the start and end of the clock."""
    import gevent
    from gevent.event import Event

    phase = _Phase(spec)
    go = Event()
    warmed: list[int] = []
    clock: dict[str, float] = {}

    def worker(slot: int) -> None:
        sock: socket.socket | None = None
        try:
            sock = phase.connect()
            for k in range(phase.warmup):
                parser, _ = phase.exchange(sock, phase.payload(-(slot * phase.warmup + k + 1)))
                if parser.close:
                    sock.close()
                    sock = phase.connect()
        except (OSError, ParseError) as exc:
            phase.errors.append(f"warmup: {type(exc).__name__}: {exc}")
            sock = None
        warmed.append(slot)
        go.wait(timeout=60)
        while phase.next_index < phase.count and time.perf_counter() < clock["deadline"]:
            index = phase.next_index
            phase.next_index += 1
            try:
                if sock is None:
                    sock = phase.connect()
                parser, elapsed = phase.exchange(sock, phase.payload(index))
            except (OSError, ParseError) as exc:
                phase.errors.append(f"{type(exc).__name__}: {exc}")
                if sock is not None:
                    sock.close()
                sock = None
                gevent.sleep(0.01)  # a refused or reset connection must not spin
                continue
            key = str(parser.status)
            phase.statuses[key] = phase.statuses.get(key, 0) + 1
            phase.latencies.append(elapsed)
            phase.tags.append(parser.headers.get(phase.header, ""))
            if parser.close:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    clock["deadline"] = time.perf_counter() + 3600
    greenlets = [gevent.spawn(worker, slot) for slot in range(phase.concurrency)]
    limit = time.monotonic() + 60
    while len(warmed) < phase.concurrency and time.monotonic() < limit:
        gevent.sleep(0.005)
    client_before = os.times()
    ticks_before = cpu_ticks(phase.cpu_pids)
    started = time.perf_counter()
    clock["deadline"] = started + phase.seconds
    go.set()
    gevent.joinall(greenlets, timeout=phase.seconds + SOCKET_TIMEOUT + 30)
    wall = time.perf_counter() - started
    ticks_after = cpu_ticks(phase.cpu_pids)
    client_after = os.times()
    gevent.killall([g for g in greenlets if not g.dead], timeout=5)
    return {
        "latencies": phase.latencies,
        "tags": phase.tags,
        "statuses": phase.statuses,
        "errors": phase.errors[:20],
        "error_count": len(phase.errors),
        "wall": wall,
        "cpu_seconds": (ticks_after - ticks_before) / os.sysconf("SC_CLK_TCK"),
        "client_cpu_seconds": (client_after.user - client_before.user) + (client_after.system - client_before.system),
    }


def main() -> None:
    """One JSON phase per stdin line in, one JSON result per stdout line out, until stdin closes."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            result = run_phase(json.loads(line))
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which raises it there
            result = {"fatal": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------------------
# The driver side (no gevent): used by tools/bench.py.


class LoadGenerator:
    """The load-generator process, kept across phases so each phase costs no interpreter start."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )

    def run(self, **spec: Any) -> dict[str, Any]:
        """Run one phase (see run_phase for the fields) and return its raw result."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        limit = float(spec.get("seconds") or 60) + SOCKET_TIMEOUT + 120
        ready, _, _ = select.select([self.process.stdout], [], [], limit)
        if not ready:
            raise TimeoutError(f"load generator gave no result within {limit:.0f}s")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited ({self.process.poll()})")
        result = json.loads(line)
        if "fatal" in result:
            raise RuntimeError(f"load generator failed: {result['fatal']}")
        return result

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":
    main()
