if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

# The fault suite of issue 12: `make chaos` (or `python tools/chaos.py [--quick] [--only a,b]`).
#
# It starts a real gunicorn (2 gevent workers), a Redis of its own on another port and the mock upstream, then runs
# each experiment against them while a load of chat requests runs, and prints one markdown table: requests, 5xx
# by code, lost (no answer at all), wrong or bad-cached answers, recovery seconds, peak worker RSS, and the
# experiment's target where the issue sets one. Experiments: Redis killed and restarted empty, slowed (DEBUG SLEEP,
# CLIENT PAUSE), its scripts flushed; upstream 429 storm, 5xx burst, resets mid-stream, hangs, a 200 MB answer;
# a worker SIGKILLed; slowloris heads, idle keep-alives, slow bodies with and without a key; a fuzz corpus
# (FUZZ_CASES cases, chunked framing and header abuse included).
#
# Only this process is monkey-patched (the tests import `fuzz_corpus` and `send_raw` from here unpatched). All
# traffic stays on 127.0.0.1; the load is bounded (LOAD_CLIENTS connections, a few seconds per experiment).

import argparse
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import Gateway, MockUpstream, RedisServer, wait_until  # noqa: E402
from tools.bench import worker_pids  # noqa: E402 - the workers, not the master's slot releaser
from tools.bench_client import ParseError, ResponseParser  # noqa: E402

MODEL = "mock-gpt"
CHAT_PATH = "/v1/chat/completions"
LOAD_CLIENTS = 20
FUZZ_CASES = 5200
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
KEYS = {name: f"sk-chaos-{name}-{uuid.uuid4().hex[:16]}" for name in ("load", "probe", "slots", "attacker")}
UPSTREAM_KEY = f"sk-chaos-upstream-{uuid.uuid4().hex}"


# -- raw HTTP ---------------------------------------------------------------------------------------------------

@dataclass
class Answer:
    status: int  # 0: no answer at all (refused, reset, timed out)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0
    error: str | None = None


def request_bytes(method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def send_raw(port: int, raw: bytes, timeout: float = 10.0) -> Answer:
    """One request on a fresh connection; the answer read to its end (or the connection's)."""
    started = time.monotonic()
    parser = ResponseParser(keep_body=True)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            try:
                sock.sendall(raw)
            except OSError:
                pass  # the server may refuse (and close) before reading everything: its answer still counts
            while True:
                data = sock.recv(65536)
                if not data:
                    if not parser.finish():
                        break
                    break
                if parser.feed(data):
                    break
    except (OSError, ParseError) as exc:
        if not parser.status:
            return Answer(0, seconds=time.monotonic() - started, error=type(exc).__name__)
    if not parser.status:
        return Answer(0, seconds=time.monotonic() - started, error="closed")
    return Answer(parser.status, dict(parser.headers), bytes(parser.body), time.monotonic() - started)


def is_json_error(answer: Answer) -> bool:
    """An OpenAI-style error: JSON content type, an `error` object with message and type."""
    if not answer.headers.get("content-type", "").startswith("application/json"):
        return False
    try:
        error = json.loads(answer.body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)


def chat(text: str, **extra: Any) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}).encode()


# -- the fuzz corpus --------------------------------------------------------------------------------------------

def fuzz_corpus(count: int, key: str, seed: int = 12) -> list[tuple[str, bytes]]:
    """`count` hostile requests (name, raw bytes): malformed JSON and field types, duplicate keys, encodings, chunked
    framing abuse, header and request-line abuse. Deterministic for a seed."""
    rng = random.Random(seed)
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    cases: list[tuple[str, bytes]] = []
    bodies = list(_body_mutations(rng))
    paths = (CHAT_PATH, "/v1/completions", "/v1/embeddings")
    framings = (_plain, _chunked, _chunked_odd)
    generators: list[Callable[[], tuple[str, bytes]]] = [
        lambda: _pick_body(rng, bodies, paths, framings, auth),
        lambda: _pick_body(rng, bodies, paths, framings, auth),
        lambda: _pick_body(rng, bodies, paths, framings, auth),
        lambda: _chunk_abuse(rng, auth),
        lambda: _header_abuse(rng, key),
        lambda: _request_line_abuse(rng),
    ]
    while len(cases) < count:
        cases.append(rng.choice(generators)())
    return cases


def _pick_body(rng: random.Random, bodies: list[tuple[str, bytes]], paths: tuple[str, ...],
               framings: tuple[Callable[..., bytes], ...], auth: dict[str, str]) -> tuple[str, bytes]:
    name, body = rng.choice(bodies)
    path = rng.choice(paths)
    framing = rng.choice(framings)
    return f"body:{name}:{framing.__name__}", framing("POST", path, body, auth)


def _plain(method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    return request_bytes(method, path, body, {**headers, "Cache-Control": "no-store"})


def _chunked(method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = request_bytes(method, path, None, {**headers, "Transfer-Encoding": "chunked", "Cache-Control": "no-store"})
    middle = len(body) // 2
    return head + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (middle, body[:middle], len(body) - middle, body[middle:])


def _chunked_odd(method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """Valid but unusual chunking: one-byte chunks, upper-case hex, extensions, a trailer."""
    head = request_bytes(method, path, None, {**headers, "Transfer-Encoding": "chunked", "Cache-Control": "no-store"})
    pieces = b"".join(b"%X;ext=1\r\n%s\r\n" % (1, body[i:i + 1]) for i in range(min(len(body), 40)))
    rest = body[40:]
    if rest:
        pieces += b"%X\r\n%s\r\n" % (len(rest), rest)
    return head + pieces + b"0\r\nX-Trailer: t\r\n\r\n"


def _body_mutations(rng: random.Random) -> Iterator[tuple[str, bytes]]:
    base = {"model": MODEL, "messages": [{"role": "user", "content": "fuzz"}]}
    weird_values: list[Any] = [None, True, False, 0, -1, 1.5, 2**63, -(2**63), 1e308, "", "x" * 5000, [], {}, [1],
                               {"a": 1}, "\u0000", "\U0001F600", [None], [[[]]]]
    for name in ("model", "messages", "stream", "temperature", "top_p", "n", "max_tokens", "max_completion_tokens",
                 "stream_options", "prompt", "input", "tools", "user", "logprobs"):
        for value in weird_values:
            yield f"{name}={type(value).__name__}", json.dumps({**base, name: value}).encode()
    for value in weird_values:
        yield f"message={type(value).__name__}", json.dumps({**base, "messages": [value]}).encode()
        yield f"role={type(value).__name__}", json.dumps(
            {**base, "messages": [{"role": value, "content": "x"}]}).encode()
        yield f"content={type(value).__name__}", json.dumps(
            {**base, "messages": [{"role": "user", "content": value}]}).encode()
    good = json.dumps(base).encode()
    for cut in range(1, len(good), 3):
        yield "truncated", good[:cut]
    yield "empty", b""
    yield "array", b"[]"
    yield "string", b'"x"'
    yield "number", b"1"
    yield "nan", good[:-1] + b',"temperature":NaN}'
    yield "infinity", good[:-1] + b',"temperature":Infinity}'
    yield "dup-model", b'{"model":"a","messages":[{"role":"user","content":"x"}],"model":"' + MODEL.encode() + b'"}'
    yield "dup-stream", good[:-1] + b',"stream":false,"stream":true}'
    yield "dup-n", good[:-1] + b',"n":1,"n":100000}'
    yield "bom", b"\xef\xbb\xbf" + good
    yield "utf16", good.decode().encode("utf-16")
    yield "latin1", good.replace(b"fuzz", b"f\xe9zz")
    yield "lone-surrogate", good.replace(b"fuzz", b"\\ud800")
    yield "cesu8", good.replace(b"fuzz", b"\xed\xa0\x80")
    yield "nul", good.replace(b"fuzz", b"\x00")
    yield "deep", b'{"model":"' + MODEL.encode() + b'","messages":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    yield "deep-object", b'{"a":' * 20_000 + b"1" + b"}" * 20_000
    yield "huge-number", good[:-1] + b',"n":' + b"9" * 5000 + b"}"
    yield "many-keys", good[:-1] + b"," + b",".join(b'"k%d":%d' % (i, i) for i in range(5000)) + b"}"
    for _ in range(200):
        raw = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        yield "flipped", bytes(raw)


def _chunk_abuse(rng: random.Random, headers: dict[str, str]) -> tuple[str, bytes]:
    head = request_bytes("POST", CHAT_PATH, None, {**headers, "Transfer-Encoding": "chunked"})
    body = chat("chunk abuse")
    sizes = [b"ZZ", b"-1", b"0x10", b"1 2", b"", b" ", b"FFFFFFFFFFFFFFFFFFFF", b"9" * 100, b"%x" % (10**9),
             b"+5", b"5;", b"5;a=\"unterminated", b"5\r", b"\xff", b"10000000000000000"]
    kind = rng.randrange(5)
    if kind == 0:
        return "chunk:size", head + rng.choice(sizes) + b"\r\n" + body + b"\r\n0\r\n\r\n"
    if kind == 1:  # the size is right, the terminator is not
        ending = rng.choice([b"XX", b"\n", b""])
        return "chunk:terminator", head + b"%x\r\n%s" % (len(body), body) + ending + b"0\r\n\r\n"
    if kind == 2:  # a size line with no end
        return "chunk:long-line", head + b"1" * rng.choice([100, 9000, 20000])
    if kind == 3:  # a trailer section far too large
        trailer = b"X-T: " + b"t" * 300_000 + b"\r\n\r\n"
        return "chunk:trailer", head + b"%x\r\n%s\r\n0\r\n" % (len(body), body) + trailer
    return "chunk:truncated", head + b"%x\r\n%s" % (len(body) + 50, body)


def _header_abuse(rng: random.Random, key: str) -> tuple[str, bytes]:
    body = chat("header abuse")
    kind = rng.randrange(12)
    base = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    if kind == 0:
        big = "b" * rng.choice([9000, 70000])
        return "hdr:huge-value", request_bytes("POST", CHAT_PATH, body, {**base, "X-Big": big})
    if kind == 1:
        many = "".join(f"X-H{i}: v\r\n" for i in range(rng.choice([101, 500])))
        raw = request_bytes("POST", CHAT_PATH, body, base)
        return "hdr:many", raw.replace(b"\r\n\r\n", b"\r\n" + many.encode() + b"\r\n", 1)
    if kind == 2:
        raw = request_bytes("POST", CHAT_PATH, body, base)
        return "hdr:two-lengths", raw.replace(b"Content-Length:", b"Content-Length: 3\r\nContent-Length:", 1)
    if kind == 3:
        value = rng.choice(["-1", "abc", "1e3", "99999999999999999999", " 5", "0x10", ""])
        raw = request_bytes("POST", CHAT_PATH, None, {**base, "Content-Length": value}) + body
        return "hdr:bad-length", raw
    if kind == 4:
        te = rng.choice(["chunked, chunked", "gzip", "identity", "chunked, gzip", "br, chunked", "xchunked",
                         "chunked\x0b"])
        return "hdr:transfer-encoding", request_bytes("POST", CHAT_PATH, None, {**base, "Transfer-Encoding": te}) + body
    if kind == 5:
        raw = request_bytes("POST", CHAT_PATH, None, {**base, "Transfer-Encoding": "chunked"})
        return "hdr:te-and-length", raw.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n", 1) + b"0\r\n\r\n"
    if kind == 6:
        auth = rng.choice(["Bearer", "Bearer ", "Basic abc", "Bearer " + "k" * 10000, "bearer " + key, "Bearer \u00e9",
                           f"Bearer {key} extra", "Bearer\t" + key])
        return "hdr:auth", request_bytes("POST", CHAT_PATH, body, {"Content-Type": "application/json",
                                                                      "Authorization": auth})
    if kind == 7:
        name = rng.choice(["Bad Name", "X\x00Y", "(x)", "X:Y", "\u00e9", ""])
        return "hdr:bad-name", request_bytes("POST", CHAT_PATH, body, base).replace(
            b"\r\n\r\n", f"\r\n{name}: v\r\n\r\n".encode(), 1)
    if kind == 8:
        value = rng.choice(["a\rb", "a\x00b", "\x7f", "x" * 8000])
        return "hdr:bad-value", request_bytes("POST", CHAT_PATH, body, base).replace(
            b"\r\n\r\n", b"\r\nX-V: " + value.encode("latin-1") + b"\r\n\r\n", 1)
    if kind == 9:
        extra = rng.choice([{"X-Cache-TTL": "-5"}, {"X-Cache-TTL": "abc"}, {"X-Cache-TTL": "9" * 40},
                            {"Cache-Control": "no-cache, no-store, " * 200}, {"X-Request-ID": "x" * 5000},
                            {"X-Request-ID": "\u00e9\u00e9"}, {"X-Forwarded-For": ",,,," * 500}])
        return "hdr:gateway", request_bytes("POST", CHAT_PATH, body, {**base, **extra})
    if kind == 10:
        return "hdr:folded", request_bytes("POST", CHAT_PATH, body, base).replace(
            b"\r\n\r\n", b"\r\nX-F: a\r\n  folded\r\n\r\n", 1)
    return "hdr:expect", request_bytes("POST", CHAT_PATH, body, {**base, "Expect": rng.choice(["100-continue", "x"])})


def _request_line_abuse(rng: random.Random) -> tuple[str, bytes]:
    line = rng.choice([
        b"GET /" + b"a" * 9000 + b" HTTP/1.1", b"G@T / HTTP/1.1", b"GET / HTTP/9.9", b"GET / HTTP/1.1 extra",
        b"GET", b"/ HTTP/1.1", b"GET http://evil/v1/models HTTP/1.1", b"GET /v1/models\x00 HTTP/1.1",
        b"GET /%zz HTTP/1.1", b"GET /v1/../v1/models HTTP/1.1", b"PRI * HTTP/2.0", b"CONNECT 127.0.0.1:1 HTTP/1.1",
        b"TRACE / HTTP/1.1", b"DELETE /v1/chat/completions HTTP/1.1", b"GET /admin/cache/stats HTTP/1.1",
        b"GET /metrics HTTP/1.1", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"GET / HTTP/1.0",
        b"get /healthz HTTP/1.1", b"GET /" + "\u00e9".encode() + b" HTTP/1.1",
    ])
    return "line", line + b"\r\nHost: 127.0.0.1\r\n\r\n"


@dataclass
class FuzzResult:
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    not_json: list[str] = field(default_factory=list)  # error answers that are not OpenAI-style JSON
    no_answer: Counter = field(default_factory=Counter)


def run_fuzz(port: int, cases: list[tuple[str, bytes]], concurrency: int = 8, timeout: float = 15.0) -> FuzzResult:
    """Every case on its own connection, `concurrency` at a time (threads, or greenlets when patched)."""
    result = FuzzResult()
    lock = threading.Lock()
    queue = list(enumerate(cases))

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                _, (name, raw) = queue.pop()
            answer = send_raw(port, raw, timeout)
            with lock:
                result.cases += 1
                result.statuses[answer.status] += 1
                if answer.status == 0:
                    result.no_answer[name.split(":")[0]] += 1
                elif answer.status >= 400 and not is_json_error(answer):
                    result.not_json.append(f"{name} -> {answer.status} {answer.body[:80]!r}")

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return result


# -- processes --------------------------------------------------------------------------------------------------

def redis_client(server: RedisServer, timeout: float = 5.0) -> Any:
    import redis

    return redis.Redis.from_url(server.url, socket_timeout=timeout)


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssSampler:
    """Peak RSS of any one worker (and its growth over the start) while the block runs."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.start = max((rss_mb(p) for p in worker_pids(master)), default=0.0)
        self.peak = self.start
        self._running = False

    def __enter__(self) -> "RssSampler":
        self._running = True
        self._greenlet = gevent.spawn(self._run)
        return self

    def _run(self) -> None:
        while self._running:
            self.peak = max([self.peak, *(rss_mb(p) for p in worker_pids(self.master))])
            gevent.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._greenlet.join(timeout=2)


# -- load -------------------------------------------------------------------------------------------------------

@dataclass
class LoadStats:
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    wrong: int = 0
    cache: Counter = field(default_factory=Counter)
    timeline: list[tuple[float, int, str]] = field(default_factory=list)  # (t, status, X-Cache)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def p99_ms(self) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


class Load:
    """LOAD_CLIENTS greenlets sending chat requests as fast as answers come, each on a keep-alive connection.

    cached=True: prompts from a small pool (mostly cache hits); False: unique prompts with `no-store`, so every
    request reaches the upstream. Each 200 is checked against the mock's deterministic answer.
    """

    def __init__(self, port: int, key: str, *, cached: bool, clients: int = LOAD_CLIENTS, stream: bool = False,
                 timeout: float = 15.0) -> None:
        self.port, self.key, self.cached, self.clients, self.stream = port, key, cached, clients, stream
        self.timeout = timeout
        self.stats = LoadStats()
        self._stop = False
        self._greenlets: list[Any] = []
        self.started = 0.0

    def __enter__(self) -> "Load":
        self.started = time.monotonic()
        self._greenlets = [gevent.spawn(self._client, i) for i in range(self.clients)]
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        gevent.joinall(self._greenlets, timeout=self.timeout + 5)
        gevent.killall(self._greenlets, block=False)

    def _client(self, index: int) -> None:
        sock: socket.socket | None = None
        n = 0
        while not self._stop:
            n += 1
            text = f"chaos {index % 8} {n % 25}" if self.cached else f"chaos {uuid.uuid4().hex}"
            headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
            if not self.cached:
                headers["Cache-Control"] = "no-store"
            raw = request_bytes("POST", CHAT_PATH, chat(text, stream=self.stream), headers)
            started = time.monotonic()
            status, head, body = 0, {}, b""
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
                    sock.settimeout(self.timeout)
                sock.sendall(raw)
                parser = ResponseParser(keep_body=True)
                while True:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("closed")
                    if parser.feed(data):
                        break
                status, head, body = parser.status, parser.headers, bytes(parser.body)
                if parser.close or head.get("connection") == "close":
                    sock.close()
                    sock = None
            except (OSError, ParseError):
                if sock is not None:
                    sock.close()
                    sock = None
            elapsed = time.monotonic() - started
            stats = self.stats
            stats.statuses[status] += 1
            stats.latencies.append(elapsed)
            cache = head.get("x-cache", "-")
            if cache == "HIT":
                cache += "/" + head.get("x-cache-layer", "?")
            stats.cache[cache] += 1
            stats.timeline.append((started - self.started, status, cache))
            if status == 200 and not _correct(body, text, self.stream):
                stats.wrong += 1
            if status == 0:
                time.sleep(0.05)  # a refused connection: do not spin


def _correct(body: bytes, text: str, stream: bool) -> bool:
    expected = f"Mock answer to: {text}"
    if stream:
        parts = []
        for line in body.split(b"\n"):
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                for choice in event.get("choices") or []:
                    parts.append((choice.get("delta") or {}).get("content") or "")
        return "".join(parts) == expected
    try:
        return json.loads(body)["choices"][0]["message"]["content"] == expected
    except (ValueError, KeyError, IndexError, TypeError):
        return False


# -- the experiments --------------------------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    requests: int = 0
    five_xx: Counter = field(default_factory=Counter)
    lost: int = 0
    wrong: int = 0
    recovery: str = "—"
    peak_rss: float = 0.0
    rss_growth: float = 0.0
    p99_ms: float = 0.0
    rps: float = 0.0
    target: str = ""
    result: str = ""


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.rows: list[Row] = []
        self.baseline_rps = 0.0

    # setup ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.redis = RedisServer("--enable-debug-command", "yes").start()  # DEBUG SLEEP
        self.upstream = MockUpstream()
        self.workdir = Path(tempfile.mkdtemp(prefix="chaos-"))
        keys_file = self.workdir / "keys.yaml"
        keys_file.write_text(
            "tenants:\n"
            f"  - {{name: load, keys: [{KEYS['load']}], limits: {{rpm: 10000000}}}}\n"
            f"  - {{name: probe, keys: [{KEYS['probe']}]}}\n"
            f"  - {{name: slots, keys: [{KEYS['slots']}], limits: {{concurrency: 5}}}}\n"
            f"  - {{name: attacker, keys: [{KEYS['attacker']}]}}\n")
        self.gateway = Gateway({
            "TARGET_URL": self.upstream.url, "UPSTREAM_API_KEYS": UPSTREAM_KEY, "REDIS_URL": self.redis.url,
            "GATEWAY_KEYS_FILE": str(keys_file), "SEMANTIC_CACHE_ENABLED": "false",
            "UPSTREAM_BACKOFF_FACTOR": "0.05", "UPSTREAM_MAX_RETRIES": "2", "UPSTREAM_READ_TIMEOUT": "5",
            "MAX_RESPONSE_BYTES": str(MAX_RESPONSE_BYTES), "LOG_LEVEL": "WARNING",
        }, workers=self.args.workers, timeout=120)
        self.port = self.gateway.port
        self.master = self.gateway.process.pid

    def stop(self) -> None:
        for closer in (self.gateway.stop, self.upstream.stop, self.redis.kill):
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 - tear everything down whatever one part does
                print(f"  (teardown: {type(exc).__name__}: {exc})", file=sys.stderr)

    def seconds(self, full: float) -> float:
        return full / 2 if self.quick else full

    # helpers -------------------------------------------------------------------------------------------------
    def under_load(self, name: str, action: Callable[[Load], str | None], *, cached: bool = True,
                   seconds: float = 8.0, stream: bool = False, key: str = "load") -> tuple[Row, Load]:
        self.upstream.reset()
        with RssSampler(self.master) as rss, Load(self.port, KEYS[key], cached=cached, stream=stream) as load:
            recovery = action(load)
            left = seconds - (time.monotonic() - load.started)
            if left > 0:
                gevent.sleep(left)
        elapsed = time.monotonic() - load.started
        row = self.row(name, load.stats, rss, elapsed)
        if recovery is not None:
            row.recovery = recovery
        return row, load

    def cache_back(self, limit: float = 10.0) -> str:
        """Seconds until the cache uses Redis again: a new prompt (another tenant's) answered `MISS`, which needs a
        Redis round trip (`BYPASS` while the workers still skip Redis). Not read off the load's answers: its prompts
        sit in every worker's L0, which keeps answering through a short outage (LOCAL_CACHE_OUTAGE_SECONDS)."""
        started = time.monotonic()
        while time.monotonic() - started < limit:
            answer = send_raw(self.port, request_bytes("POST", CHAT_PATH, chat(f"back? {uuid.uuid4().hex}"), {
                "Authorization": f"Bearer {KEYS['probe']}", "Content-Type": "application/json"}), timeout=5)
            if answer.status == 200 and answer.headers.get("x-cache") == "MISS":
                return f"{time.monotonic() - started:.2f}"
            gevent.sleep(0.02)
        return "not back"

    @staticmethod
    def recovery(load: Load, since: float, ok: Callable[[int, str], bool]) -> str:
        """Seconds from `since` (into the load) to the first answer `ok(status, x_cache)` accepts."""
        back = [t for t, status, cache in load.stats.timeline if t > since and ok(status, cache)]
        return f"{min(back) - since:.2f}" if back else "not back"

    def row(self, name: str, stats: LoadStats, rss: RssSampler, elapsed: float) -> Row:
        row = Row(name, requests=stats.requests, lost=stats.statuses[0], wrong=stats.wrong,
                  peak_rss=rss.peak, rss_growth=rss.peak - rss.start, p99_ms=stats.p99_ms(),
                  rps=stats.requests / elapsed if elapsed else 0.0)
        row.five_xx = Counter({s: c for s, c in stats.statuses.items() if s >= 500})
        return row

    def probe(self, seconds: float, interval: float = 0.1) -> LoadStats:
        """Another tenant's requests, one at a time, while an attack runs: latency and failures."""
        stats = LoadStats()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            text = f"probe {uuid.uuid4().hex}"
            answer = send_raw(self.port, request_bytes("POST", CHAT_PATH, chat(text), {
                "Authorization": f"Bearer {KEYS['probe']}", "Content-Type": "application/json",
                "Cache-Control": "no-store"}), timeout=15)
            stats.statuses[answer.status] += 1
            stats.latencies.append(answer.seconds)
            if answer.status == 200 and not _correct(answer.body, text, False):
                stats.wrong += 1
            gevent.sleep(interval)
        return stats

    # experiments ---------------------------------------------------------------------------------------------
    def baseline(self) -> Row:
        row, _ = self.under_load("baseline (cached load)", lambda load: None, seconds=self.seconds(8))
        self.baseline_rps = row.rps
        return row

    def redis_killed(self) -> Row:
        def action(load: Load) -> str:
            gevent.sleep(2)
            self.redis.kill()
            gevent.sleep(3)
            self.redis.start()
            started = time.monotonic()
            back = self.cache_back()
            gevent.sleep(max(0.0, 3 - (time.monotonic() - started)))
            return back

        row, _ = self.under_load("Redis killed 3 s, restarted empty", action, seconds=9)
        return row

    def redis_debug_sleep(self) -> Row:
        stop = threading.Event()

        def action(load: Load) -> str:
            def sleeper() -> None:
                client = redis_client(self.redis, timeout=10)
                while not stop.is_set():
                    try:
                        client.execute_command("DEBUG", "SLEEP", "2")
                    except Exception:  # noqa: BLE001 - keep slowing whatever the client says
                        time.sleep(0.1)

            greenlet = gevent.spawn(sleeper)
            gevent.sleep(self.seconds(8))
            stop.set()
            greenlet.join(timeout=5)
            return "—"

        # The ratio compares like with like: the same load on a well Redis just before, not the first experiment's
        # baseline minutes earlier (the machine's speed moves more than that between experiments).
        well, _ = self.under_load("Redis well (just before)", lambda load: None, seconds=self.seconds(8))
        row, _ = self.under_load("Redis DEBUG SLEEP 2 in a loop", action, seconds=self.seconds(8))
        if well.rps:
            share = row.rps / well.rps
            row.target = "throughput ≥ 80 % of a well Redis just before"
            row.result = f"{share:.0%} ({row.rps:.0f} vs {well.rps:.0f} req/s)"
        return row

    def redis_client_pause(self) -> Row:
        def action(load: Load) -> str:
            gevent.sleep(1)
            redis_client(self.redis).execute_command("CLIENT", "PAUSE", "3000", "ALL")
            gevent.sleep(3)
            started = time.monotonic()
            back = self.cache_back()
            gevent.sleep(max(0.0, 2 - (time.monotonic() - started)))
            return back

        row, _ = self.under_load("Redis CLIENT PAUSE 3 s", action, seconds=7)
        return row

    def redis_script_flush(self) -> Row:
        def action(load: Load) -> str:
            client = redis_client(self.redis)
            end = time.monotonic() + self.seconds(6)
            while time.monotonic() < end:
                client.script_flush()
                gevent.sleep(0.2)
            return "—"

        row, _ = self.under_load("Redis SCRIPT FLUSH every 0.2 s", action, seconds=self.seconds(6))
        return row

    def upstream_429_storm(self) -> Row:
        def action(load: Load) -> str:
            gevent.sleep(1)
            self.upstream.faults({"status": 429, "retry_after": 1, "times": -1})
            gevent.sleep(3)
            requests_delete(self.upstream.url + "/_mock/faults")
            cleared = time.monotonic() - load.started
            gevent.sleep(4)
            return self.recovery(load, cleared, lambda status, cache: status == 200)

        row, load = self.under_load("upstream 429 storm (3 s)", action, cached=False, seconds=8)
        row.result = f"gateway 429s: {load.stats.statuses[429]}"
        return row

    def upstream_5xx_burst(self) -> Row:
        def action(load: Load) -> str:
            gevent.sleep(1)
            self.upstream.faults({"status": 500, "times": 34})
            gevent.sleep(1)
            self.upstream.faults({"kind": "reset", "times": 27})
            return "—"

        row, load = self.under_load("upstream 34 × 500 + 27 resets", action, cached=False, seconds=self.seconds(8))
        upstream_429 = 0  # the mock answered none in this experiment
        invented = load.stats.statuses[429] - upstream_429
        row.target, row.result = "gateway 429s ≤ upstream 429s", f"{load.stats.statuses[429]} gateway 429s (0 upstream)"
        row.result += " ok" if invented <= 0 else " FAIL"
        return row

    def upstream_resets_mid_stream(self) -> Row:
        """Streams cut after two events: the clients see an error event; nothing partial is cached."""
        self.upstream.reset()
        prompts = [f"reset {uuid.uuid4().hex}" for _ in range(20)]
        self.upstream.faults({"kind": "reset", "after_chunks": 2, "times": len(prompts)})
        stats = LoadStats()
        with RssSampler(self.master) as rss:
            started = time.monotonic()
            for text in prompts:
                answer = send_raw(self.port, request_bytes("POST", CHAT_PATH, chat(text, stream=True), {
                    "Authorization": f"Bearer {KEYS['probe']}", "Content-Type": "application/json"}))
                stats.statuses[answer.status] += 1
                if answer.status == 200 and _correct(answer.body, text, True):
                    stats.wrong += 1  # a cut stream cannot be complete
            for text in prompts:  # the same prompts again: a cut answer must not come from the cache
                answer = send_raw(self.port, request_bytes("POST", CHAT_PATH, chat(text), {
                    "Authorization": f"Bearer {KEYS['probe']}", "Content-Type": "application/json"}))
                stats.statuses[answer.status] += 1
                if answer.status == 200 and not _correct(answer.body, text, False):
                    stats.wrong += 1  # a partial answer served from the cache
        row = self.row("upstream resets mid-stream (20 streams)", stats, rss, time.monotonic() - started)
        row.result = f"{stats.statuses[200]} × 200 of {stats.requests} (cut streams end with an error event)"
        return row

    def upstream_hangs(self) -> Row:
        def action(load: Load) -> str:
            gevent.sleep(1)
            self.upstream.faults({"kind": "delay", "seconds": 30, "times": 10})
            return "—"

        row, load = self.under_load("upstream hangs (10 × 30 s, read timeout 5 s)", action, cached=False, seconds=8)
        row.result = f"{load.stats.statuses[504]} × 504 after the read timeout"
        return row

    def upstream_huge(self) -> Row:
        """A 200 MB answer: 502, the worker's memory bounded, nothing stored."""
        self.upstream.reset()
        text = f"huge {uuid.uuid4().hex}"
        raw = request_bytes("POST", CHAT_PATH, chat(text), {"Authorization": f"Bearer {KEYS['probe']}",
                                                             "Content-Type": "application/json"})
        stats = LoadStats()
        results = []
        with RssSampler(self.master) as rss:
            started = time.monotonic()
            for chunked in (False, True):
                self.upstream.faults({"kind": "huge", "bytes": 200 * 1024 * 1024, "chunked": chunked})
                answer = send_raw(self.port, raw, timeout=60)
                stats.statuses[answer.status] += 1
                results.append(answer.status)
            again = send_raw(self.port, raw)
            stats.statuses[again.status] += 1
        row = self.row("upstream 200 MB answer (length, chunked)", stats, rss, time.monotonic() - started)
        stored = again.headers.get("x-cache") == "HIT"
        redis_mb = redis_client(self.redis).info("memory")["used_memory"] / 2**20
        limit = 2 * MAX_RESPONSE_BYTES / 2**20
        ok = results == [502, 502] and row.rss_growth <= limit and not stored and redis_mb < 50
        row.target = f"502, RSS growth ≤ {limit:.0f} MB, not stored"
        row.result = (f"{results}, +{row.rss_growth:.0f} MB, repeat {again.headers.get('x-cache')}, "
                      f"Redis {redis_mb:.1f} MB " + ("ok" if ok else "FAIL"))
        row.five_xx = Counter()  # the 502s are the expected answer here, listed in the result
        return row

    def worker_sigkill(self) -> Row:
        """A worker holding a tenant's concurrency slots (limit 5) is killed: how soon are they back?"""
        self.upstream.reset()
        self.upstream.faults({"kind": "delay", "seconds": 30, "times": 5})
        headers = {"Authorization": f"Bearer {KEYS['slots']}", "Content-Type": "application/json",
                   "Cache-Control": "no-store"}
        held = [gevent.spawn(send_raw, self.port, request_bytes("POST", CHAT_PATH, chat(f"hold {i}"), headers), 40)
                for i in range(5)]
        gevent.sleep(1.0)
        requests_delete(self.upstream.url + "/_mock/faults")
        stats = LoadStats()
        with RssSampler(self.master) as rss:
            for pid in worker_pids(self.master):
                os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            limit = 15 if self.quick else 75
            back = None
            while time.monotonic() - killed < limit:
                batch = [gevent.spawn(send_raw, self.port, request_bytes(
                    "POST", CHAT_PATH, chat(f"slot {uuid.uuid4().hex}"), headers), 10) for _ in range(5)]
                gevent.joinall(batch)
                for g in batch:
                    stats.statuses[g.value.status] += 1
                if all(g.value.status == 200 for g in batch):
                    back = time.monotonic() - killed
                    break
                gevent.sleep(0.25)
        gevent.joinall(held, timeout=5)
        for g in held:
            stats.statuses[g.value.status if g.value else 0] += 1
        wait_until(lambda: len(worker_pids(self.master)) == self.args.workers, 60, "workers back")
        row = self.row("worker SIGKILL holding 5 concurrency slots", stats, rss, time.monotonic() - killed)
        row.recovery = f"{back:.2f}" if back is not None else f"> {limit}"
        row.target = "slots back within 2 s"
        row.result = "ok" if back is not None and back <= 2 else "FAIL"
        return row

    def _attack(self, name: str, count: int, opener: Callable[[], socket.socket | None],
                keep: Callable[[socket.socket], None] | None, seconds: float, target: str = "") -> Row:
        """`count` hostile connections, kept up by `keep` every second, while another tenant probes."""
        socks: list[socket.socket] = []
        self.upstream.reset()
        with RssSampler(self.master) as rss:
            started = time.monotonic()
            for _ in range(count):
                try:
                    sock = opener()
                except OSError:
                    continue
                if sock is not None:
                    socks.append(sock)

            def keeper() -> None:
                while True:
                    gevent.sleep(1.0)
                    for sock in list(socks):
                        try:
                            if keep is not None:
                                keep(sock)
                        except OSError:
                            socks.remove(sock)

            greenlet = gevent.spawn(keeper)
            stats = self.probe(seconds)
            greenlet.kill()
            open_at_end = len(socks)
        for sock in socks:
            sock.close()
        row = self.row(name, stats, rss, time.monotonic() - started)
        row.p99_ms = stats.p99_ms()
        row.target = target or "other tenant answered throughout"
        failed = stats.requests - stats.statuses[200]
        ok = failed == 0 and (not target or row.p99_ms <= 1000)
        row.result = (f"probe p99 {row.p99_ms:.0f} ms, {failed} failed; {open_at_end}/{count} attack sockets "
                      "still open " + ("ok" if ok else "FAIL"))
        return row

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.setblocking(False)
        return sock

    def slowloris(self) -> Row:
        def opener() -> socket.socket:
            sock = self._connect()
            sock.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            return sock

        return self._attack("slowloris heads (a header byte / s)", 300 if self.quick else 2000, opener,
                            lambda s: s.send(b"X"), self.seconds(15))

    def idle_keepalives(self) -> Row:
        def opener() -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.sendall(request_bytes("GET", "/healthz"))
            sock.recv(65536)
            sock.setblocking(False)
            return sock

        def still_open(sock: socket.socket) -> None:
            try:
                if sock.recv(1) == b"":
                    raise ConnectionResetError("closed by the gateway")
            except BlockingIOError:
                pass  # idle and open

        return self._attack("idle keep-alive connections", 300 if self.quick else 1500, opener, still_open,
                            self.seconds(15))

    def slow_bodies(self, with_key: bool) -> Row:
        body = chat("slow body " * 50)
        headers = {"Content-Type": "application/json"}
        if with_key:
            headers["Authorization"] = f"Bearer {KEYS['attacker']}"
        head = request_bytes("POST", CHAT_PATH, None, {**headers, "Content-Length": str(len(body))})

        def opener() -> socket.socket:
            sock = self._connect()
            sock.send(head + body[:1])
            return sock

        name = f"slow bodies {'with a valid key' if with_key else 'without a key'} (a byte / s)"
        return self._attack(name, 300 if self.quick else 2000, opener, lambda s: s.send(b" "), self.seconds(15),
                            target="other tenants' p99 ≤ 1 s" if with_key else "")

    def fuzz(self) -> Row:
        cases = fuzz_corpus(1200 if self.quick else FUZZ_CASES, KEYS["probe"])
        with RssSampler(self.master) as rss:
            started = time.monotonic()
            result = run_fuzz(self.port, cases, concurrency=48)
        stats = LoadStats(statuses=result.statuses)
        row = self.row(f"fuzz corpus ({result.cases} cases, chunked + header abuse)", stats, rss,
                       time.monotonic() - started)
        row.lost = 0  # a connection closed without an answer is no lost request here (listed in the result)
        ok = result.statuses[500] == 0 and not result.not_json
        row.target = "0 × 500, every error JSON"
        row.result = (f"{result.statuses[500]} × 500, {len(result.not_json)} non-JSON errors, "
                      f"{sum(result.no_answer.values())} closed unanswered " + ("ok" if ok else "FAIL"))
        for line in result.not_json[:10]:
            print(f"  non-JSON: {line}", file=sys.stderr)
        return row

    def settle(self, limit: float = 30.0) -> None:
        """Between experiments: wait until another tenant's uncached request succeeds (a key cooling down after
        the last experiment would otherwise be counted against the next one)."""
        self.upstream.reset()
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            answer = send_raw(self.port, request_bytes("POST", CHAT_PATH, chat("settle"), {
                "Authorization": f"Bearer {KEYS['probe']}", "Content-Type": "application/json",
                "Cache-Control": "no-store"}))
            if answer.status == 200:
                return
            gevent.sleep(0.5)
        print(f"  (not settled after {limit:.0f} s)", file=sys.stderr)

    def experiments(self) -> list[tuple[str, Callable[[], Row]]]:
        return [
            ("baseline", self.baseline),
            ("redis-kill", self.redis_killed),
            ("redis-sleep", self.redis_debug_sleep),
            ("redis-pause", self.redis_client_pause),
            ("redis-scripts", self.redis_script_flush),
            ("upstream-429", self.upstream_429_storm),
            ("upstream-5xx", self.upstream_5xx_burst),
            ("upstream-resets", self.upstream_resets_mid_stream),
            ("upstream-hangs", self.upstream_hangs),
            ("upstream-huge", self.upstream_huge),
            ("worker-kill", self.worker_sigkill),
            ("slowloris", self.slowloris),
            ("idle-keepalive", self.idle_keepalives),
            ("slow-bodies-key", lambda: self.slow_bodies(True)),
            ("slow-bodies-nokey", lambda: self.slow_bodies(False)),
            ("fuzz", self.fuzz),
        ]


def requests_delete(url: str) -> None:
    import requests

    requests.delete(url, timeout=5).raise_for_status()


def table(rows: list[Row]) -> str:
    lines = ["| experiment | requests | 5xx by code | lost | wrong / bad-cached | recovery s | peak worker RSS MB "
             "(growth) | p99 ms | target: result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        five = ", ".join(f"{code}: {n}" for code, n in sorted(r.five_xx.items())) or "0"
        verdict = f"{r.target}: {r.result}" if r.target else r.result
        lines.append(f"| {r.name} | {r.requests} | {five} | {r.lost} | {r.wrong} | {r.recovery} | "
                     f"{r.peak_rss:.0f} (+{r.rss_growth:.0f}) | {r.p99_ms:.0f} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter experiments, smaller attacks (a smoke run)")
    parser.add_argument("--only", default="", help="comma-separated experiment names (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    suite = Suite(args)
    chosen = [n.strip() for n in args.only.split(",") if n.strip()]
    known = [name for name, _ in suite.experiments()]
    unknown = set(chosen) - set(known)
    if unknown:
        raise SystemExit(f"unknown experiments {sorted(unknown)}; known: {', '.join(known)}")
    suite.start()
    try:
        for name, run in suite.experiments():
            if chosen and name not in chosen:
                continue
            print(f"chaos: {name} ...", file=sys.stderr, flush=True)
            suite.settle()
            row = run()
            suite.rows.append(row)
            print(f"  {row}", file=sys.stderr, flush=True)
    finally:
        suite.stop()
    print(f"\n### Reliability: {args.workers} gevent workers, own Redis, mock upstream "
          f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}{', --quick' if args.quick else ''})\n")
    print(table(suite.rows))


if __name__ == "__main__":
    main()
