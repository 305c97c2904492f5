if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

# A mock OpenAI-compatible upstream for the gateway's tests, demo and benchmarks.
#
# It answers /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models (also without the /v1 prefix)
# in the shapes OpenAI and DeepSeek use, plain and streamed, deterministically, so tests can assert on content.
# Tests script failures per request through a control API under /_mock/ (see MockUpstream.control):
#
#   POST   /_mock/faults    {"faults": [FAULT, ...]}  append to the FIFO fault queue
#   GET    /_mock/faults                               the faults still queued
#   DELETE /_mock/faults                               drop every queued fault
#   GET    /_mock/requests                             {"requests": [{path, method, key, body, headers, t, stream}]}
#   DELETE /_mock/requests                             clear the request log
#   POST   /_mock/config    {"latency": s, "chunk_delay": s}
#   GET    /_mock/config
#   POST   /_mock/reset                                log and faults cleared, command-line config restored
#
# FAULT: {"status": 429, "retry_after": 1} | {"kind": "delay" | "latency", "seconds": s}
#        | {"kind": "reset", "after_chunks": n} | {"kind": "slow_chunks", "delay": s} | {"kind": "garbage"}
#        | {"kind": "length"} | {"kind": "huge", "bytes": n, "chunked": false} (a complete 200 answer of about n
#        bytes, written 1 MiB at a time, never held whole)
#        | {"kind": "headers", "headers": {...}} (the normal answer with these headers added: OpenAI's x-ratelimit-*,
#        openai-processing-ms, openai-organization...)
#        | {"kind": "queue", "seconds": s, "interval": s} (DeepSeek under load: the head at once, then while the
#        request waits its turn blank lines before a JSON body, or `: keep-alive` comments before a stream's events;
#        "silent": true sends the head alone and nothing else for the seconds)
#        | {"kind": "wire", "crlf": true, "split": n, "gzip": true} (the same answer, framed otherwise: SSE lines
#        ended by CRLF, the body in writes of n bytes that cut events and lines anywhere, Content-Encoding: gzip),
#        each optionally with "key" (only requests with that Bearer key), "model" (only requests for that model:
#        providers limit and overload per model), "paths" (only these paths; without it a fault skips GET
#        /v1/models), "times" (uses, default 1, -1 = forever) and "seconds" (wait first). Status faults may also
#        set "message", "type", "code" and "headers".
#
# Run: python tools/mock_upstream.py --port 9100 [--latency 0.05] [--chunk-delay 0.01] [--keys k1,k2]
# It is built on gevent's pywsgi (HTTP/1.1 keep-alive, one greenlet per connection) and the standard library only,
# because it is the zero point of the latency benchmark: it must stay cheap per request at high concurrency.

import argparse
import array
import base64
import errno
import functools
import hashlib
import json
import math
import re
import secrets
import signal
import socket
import struct
import sys
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
Json = dict[str, Any]
# A ready answer: status line, headers, and the body as an iterable of byte strings (one per write).
Response = tuple[str, list[tuple[str, str]], Iterable[bytes]]

DEFAULT_MODELS = ("mock-gpt", "gpt-4o-mini", "gpt-4o", "deepseek-chat", "deepseek-reasoner", "text-embedding-3-small")
DEFAULT_DIMENSIONS = 384
REQUEST_LOG_SIZE = 10_000
MODELS_CREATED = 1_700_000_000
SYSTEM_FINGERPRINT = "fp_mock"
FAULT_KINDS = frozenset(
    {"status", "delay", "latency", "reset", "slow_chunks", "garbage", "length", "huge", "headers", "queue", "wire"}
)
HUGE_PIECE = 1024 * 1024
SSE_DONE = b"data: [DONE]\n\n"
JSON_HEADERS = (("Content-Type", "application/json"),)
SSE_HEADERS = (("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"))

_PIECES = re.compile(r"\S+\s*")  # a word with its trailing space: one "token", one stream chunk
_WORDS = re.compile(r"\w+")
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library "
    "correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
)
_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth "
    "(i.e. Authorization: Bearer YOUR_KEY)."
)
# OpenAI's error "type" and "code" per status, used when a fault does not say.
_ERROR_KINDS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Mock bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    402: ("unknown_error", "invalid_request_error", "Insufficient Balance"),  # DeepSeek: out of balance
    403: ("invalid_request_error", "unsupported_country_region_territory", "Country or region not supported."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests (mock)."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


class MockError(Exception):
    """An OpenAI-style error answer, raised from a handler and turned into JSON at the edge."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class Config:
    """What /_mock/config may change at run time; /_mock/reset restores the command-line values."""

    latency: float = 0.0
    chunk_delay: float = 0.0


@dataclass
class Request:
    """One parsed API request, as the handlers and the fault matcher see it."""

    method: str
    path: str  # without the /v1 prefix: "/chat/completions"
    key: str | None
    body: Any
    stream: bool


# ---------------------------------------------------------------------------------------------------------------
# Small pure helpers: text, tokens, vectors.


def status_line(status: int) -> str:
    """The WSGI status string, with the standard phrase when there is one."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Mock Status"


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts joined by spaces."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def last_user_text(messages: list[Any]) -> str:
    """The last user turn: what the mock answers, so tests can predict the answer from the question."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


def pieces(text: str) -> list[str]:
    """Split text into word pieces: the mock's tokens, and the content of one stream chunk each."""
    return _PIECES.findall(text) or [text]


def count_tokens(text: str) -> int:
    """A deterministic token estimate (words); at least 1 so every prompt costs something."""
    return max(1, len(_PIECES.findall(text)))


def truncate(text: str, max_tokens: int) -> str:
    """The first max_tokens pieces of text, as a model cut off by max_tokens would answer."""
    return "".join(pieces(text)[:max_tokens]).rstrip()


@functools.lru_cache(maxsize=65_536)
def _word_vector(word: str, dimensions: int) -> tuple[float, ...]:
    """A fixed pseudo-random vector per word, from its hash; cached because words repeat across requests."""
    raw = hashlib.shake_256(word.encode()).digest(2 * dimensions)
    return tuple(v / 32768.0 - 1.0 for v in struct.unpack(f"<{dimensions}H", raw))


def embed(text: str, dimensions: int) -> list[float]:
    """A unit vector for text: the normalised sum of its words' vectors.

    Equal texts give equal vectors and texts sharing words are close, which lets semantic-cache tests point the
    gateway's remote embedding client at this mock. Values are rounded to float32 so "float" and "base64" agree.
    """
    vectors = [_word_vector(word, dimensions) for word in _WORDS.findall(text.lower()) or [text]]
    total = vectors[0] if len(vectors) == 1 else [sum(column) for column in zip(*vectors, strict=True)]
    norm = math.hypot(*total) or 1.0
    return array.array("f", [v / norm for v in total]).tolist()


def float32_base64(vector: list[float]) -> str:
    """The embedding as OpenAI's base64 form: little-endian float32 bytes."""
    packed = array.array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def tool_arguments(tool: Json) -> str:
    """Arguments JSON for a tool call: each required parameter filled with a placeholder of its type."""
    params = tool.get("function", {}).get("parameters") or {}
    props = params.get("properties") or {}
    placeholders = {"string": "mock", "integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}
    args = {
        name: placeholders.get(props.get(name, {}).get("type", "string"), "mock")
        for name in params.get("required") or []
    }
    return json.dumps(args)


def chosen_tool(body: Json) -> Json | None:
    """The function tool a "call a tool" request should call: the one tool_choice names, else the first."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type", "function") == "function"]
    if not tools:
        return None
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name")
        for tool in tools:
            if tool.get("function", {}).get("name") == name:
                return tool
    return tools[0]


def encode(obj: Any) -> bytes:
    """Compact JSON bytes, through one shared encoder (json.dumps with options builds a new one every call)."""
    return _ENCODER.encode(obj).encode()


def bearer_key(environ: Environ) -> str | None:
    """The Bearer token of the request, or None without one."""
    header = environ.get("HTTP_AUTHORIZATION", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def request_headers(environ: Environ) -> dict[str, str]:
    """The request headers from the WSGI environ, with lower-case names."""
    headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
    for name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(name):
            headers[name.replace("_", "-").lower()] = environ[name]
    return headers


def positive_int(body: Json, name: str) -> int | None:
    """An optional positive integer field; a present but bad value is a 400, as the real API answers."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MockError(400, f"Invalid '{name}': expected a positive integer, got {value!r}.", param=name)
    return value


# ---------------------------------------------------------------------------------------------------------------
# Faults.


def validate_fault(fault: Any) -> Json:
    """A fault as queued: its kind settled ("status" when it carries one), uses left in "times"."""
    if not isinstance(fault, dict):
        raise MockError(400, "each fault must be an object")
    fault = dict(fault)
    kind = fault.setdefault("kind", "status" if "status" in fault else None)
    if kind not in FAULT_KINDS:
        raise MockError(400, f"unknown fault kind {kind!r}; one of {sorted(FAULT_KINDS)} or a 'status'")
    if kind == "status" and not (isinstance(fault.get("status"), int) and 200 <= fault["status"] <= 599):
        raise MockError(400, "a status fault needs an integer 'status' (200-599)")
    times = fault.setdefault("times", 1)
    if not isinstance(times, int) or times == 0 or times < -1:
        raise MockError(400, "'times' must be a positive integer or -1 (forever)")
    for name in ("seconds", "delay", "after_chunks", "retry_after", "interval", "split"):
        value = fault.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            raise MockError(400, f"'{name}' must be a number >= 0")
    if "paths" in fault:
        if not isinstance(fault["paths"], list) or not all(isinstance(p, str) for p in fault["paths"]):
            raise MockError(400, "'paths' must be a list of paths")
        fault["paths"] = [normalise_path(p) for p in fault["paths"]]
    return fault


def normalise_path(path: str) -> str:
    """The path without a leading /v1, since providers' base URLs differ in whether they include it."""
    if path.startswith("/v1/"):
        return path[3:]
    return "/" if path == "/v1" else path


def fault_wait(fault: Json | None) -> float:
    """Seconds a fault holds the answer back: its "seconds" (any kind may carry it; delay/latency default 1)."""
    if fault is None or fault["kind"] == "queue":  # a queue waits after the head, not before it
        return 0.0
    return float(fault.get("seconds", 1.0 if fault["kind"] in ("delay", "latency") else 0.0))


def fault_matches(fault: Json, request: Request) -> bool:
    """Whether a queued fault applies to this request (key and path filters; models only when asked for)."""
    if "key" in fault and fault["key"] != request.key:
        return False
    if "model" in fault and not (isinstance(request.body, dict) and request.body.get("model") == fault["model"]):
        return False
    if "paths" in fault:
        return request.path in fault["paths"]
    return not request.path.startswith("/models")


def error_response(status: int, fault: Json | None = None) -> Response:
    """An OpenAI-style error answer for a status, with a fault's overrides (message, type, code, retry_after)."""
    fault = fault or {}
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    type_, code, message = _ERROR_KINDS.get(status, (default_type, None, f"Mock error {status}."))
    body = {
        "error": {
            "message": fault.get("message", message),
            "type": fault.get("type", type_),
            "param": None,
            "code": fault.get("code", code),
        }
    }
    headers = list(JSON_HEADERS)
    if fault.get("retry_after") is not None:
        headers.append(("Retry-After", str(fault["retry_after"])))
    headers.extend((str(k), str(v)) for k, v in (fault.get("headers") or {}).items())
    return json_response(status, body, headers)


def huge_response(request: Request, size: int, chunked: bool) -> Response:
    """A well-formed answer of about `size` bytes in the route's shape (an embedding of many zeros, or a very
    long message), produced piece by piece: the mock's memory stays flat whatever the size."""
    model = request.body.get("model", "mock-gpt") if isinstance(request.body, dict) else "mock-gpt"
    usage = encode({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})
    if request.path == "/embeddings":
        head = b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0'
        filler, tail = b",0.0", b']}],"model":' + encode(model) + b',"usage":' + usage + b"}"
    else:
        head = (b'{"id":"chatcmpl-huge","object":"chat.completion","created":0,"model":' + encode(model)
                + b',"choices":[{"index":0,"message":{"role":"assistant","content":"')
        filler = b"a"
        tail = b'"},"logprobs":null,"finish_reason":"stop"}],"usage":' + usage + b"}"
    count = max(0, (size - len(head) - len(tail)) // len(filler))

    def pieces() -> Iterator[bytes]:
        yield head
        per_piece = max(1, HUGE_PIECE // len(filler))
        left = count
        while left > 0:
            n = min(left, per_piece)
            yield filler * n
            left -= n
        yield tail

    headers = list(JSON_HEADERS)
    if not chunked:
        headers.append(("Content-Length", str(len(head) + count * len(filler) + len(tail))))
    return "200 OK", headers, pieces()


def json_response(status: int, body: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    """A complete JSON answer with its Content-Length, so the connection stays reusable."""
    data = encode(body)
    headers = list(headers or JSON_HEADERS)
    headers.append(("Content-Length", str(len(data))))
    return status_line(status), headers, [data]


def reframed(headers: list[tuple[str, str]], chunks: Iterable[bytes], *, crlf: bool, split: int,
             compress: bool) -> tuple[list[tuple[str, str]], Iterator[bytes]]:
    """An answer's bytes as other servers frame them: CRLF line ends (SSE allows CR, LF or CRLF), writes of
    `split` bytes cutting events anywhere, gzip (each write flushed, so a stream still flows)."""
    headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
    if compress:
        headers.append(("Content-Encoding", "gzip"))

    def body() -> Iterator[bytes]:
        encoder = zlib.compressobj(wbits=16 + zlib.MAX_WBITS) if compress else None
        for chunk in chunks:
            if crlf:
                chunk = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            pieces_ = [chunk[i : i + split] for i in range(0, len(chunk), split)] if split > 0 else [chunk]
            for piece in pieces_:
                yield encoder.compress(piece) + encoder.flush(zlib.Z_SYNC_FLUSH) if encoder else piece
        if encoder:
            yield encoder.flush()

    return headers, body()


def abort_connection(environ: Environ) -> None:
    """Reset the TCP connection: linger 0 makes the coming close send RST instead of a clean FIN.

    Raising ECONNRESET is what pywsgi silently treats as a gone client: it stops writing (no terminating chunk),
    logs nothing, and closes the socket.
    """
    sock = environ.get("mock.socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raise ConnectionResetError(errno.ECONNRESET, "mock upstream reset fault")


# ---------------------------------------------------------------------------------------------------------------
# The application.


class MockUpstream:
    """The WSGI application: API endpoints, the fault queue, the request log and the /_mock/ control API."""

    def __init__(
        self, *, config: Config | None = None, keys: Iterable[str] = (), models: Iterable[str] = DEFAULT_MODELS
    ) -> None:
        self.initial = config or Config()
        self.config = Config(**vars(self.initial))
        self.keys = frozenset(keys)
        self.models = tuple(models)
        self.faults: list[Json] = []
        self.requests: deque[Json] = deque(maxlen=REQUEST_LOG_SIZE)
        self.routes: dict[tuple[str, str], Callable[[Request, Json | None], Response]] = {
            ("POST", "/chat/completions"): self.chat_completions,
            ("POST", "/completions"): self.completions,
            ("POST", "/embeddings"): self.embeddings,
            ("GET", "/models"): self.list_models,
        }

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        try:
            if path.startswith("/_mock/"):
                status, headers, body = self.control(environ["REQUEST_METHOD"], path, read_json(environ))
            else:
                status, headers, body = self.api(environ, path)
        except MockError as exc:
            status, headers, body = json_response(exc.status, exc.body)
        environ["mock.write"] = start_response(status, headers)  # write(b"") sends the head before any body
        return body

    # -- API requests ------------------------------------------------------------------------------------------

    def api(self, environ: Environ, raw_path: str) -> Response:
        """Log, authenticate, apply the first matching fault and the latency, then answer."""
        method = environ["REQUEST_METHOD"]
        try:
            body: Any = read_json(environ)
            bad_json = False
        except MockError:
            body, bad_json = None, True
        stream = isinstance(body, dict) and body.get("stream") is True
        request = Request(method, normalise_path(raw_path), bearer_key(environ), body, stream)
        self.requests.append(
            {
                "path": raw_path,
                "method": method,
                "key": request.key,
                "body": body,
                "headers": request_headers(environ),
                "t": time.time(),
                "stream": stream,
            }
        )
        self.authenticate(request.key)
        handler = self.routes.get((method, request.path))
        if handler is None and method == "GET" and request.path.startswith("/models/"):
            handler = self.get_model
        if handler is None:
            raise MockError(404, f"Invalid URL ({method} {raw_path})")
        if bad_json:
            raise MockError(400, _BAD_JSON)
        fault = self.take_fault(request)
        wait = self.config.latency + fault_wait(fault)
        if wait > 0:
            gevent.sleep(wait)
        if fault is None or fault["kind"] in ("delay", "latency"):
            return handler(request, None)
        if fault["kind"] == "queue":
            status, headers, chunks = handler(request, None)
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]  # chunked, as DeepSeek's
            return status, headers, self.queued(chunks, fault, stream, environ)
        if fault["kind"] == "wire":
            status, headers, chunks = handler(request, None)
            return (status, *reframed(headers, chunks, crlf=bool(fault.get("crlf")), split=int(fault.get("split", 0)),
                                      compress=bool(fault.get("gzip"))))
        if fault["kind"] == "headers":
            status, headers, chunks = handler(request, None)
            return status, [*headers, *((str(k), str(v)) for k, v in (fault.get("headers") or {}).items())], chunks
        if fault["kind"] == "status":
            return error_response(fault["status"], fault)
        if fault["kind"] == "garbage":
            return "200 OK", [*JSON_HEADERS, ("Content-Length", "8")], [b"not json"]
        if fault["kind"] == "huge":
            return huge_response(request, int(fault.get("bytes", 64 * HUGE_PIECE)), bool(fault.get("chunked")))
        if fault["kind"] == "reset" and not (stream and fault.get("after_chunks", 0) > 0):
            abort_connection(environ)
        status, headers, chunks = handler(request, fault)
        if fault["kind"] == "reset":
            chunks = self.reset_after(chunks, int(fault["after_chunks"]), environ)
        return status, headers, chunks

    def authenticate(self, key: str | None) -> None:
        """401 without a Bearer key, or with one outside --keys when keys were given."""
        if key is None:
            raise MockError(401, _NO_KEY)
        if self.keys and key not in self.keys:
            raise MockError(401, f"Incorrect API key provided: {key[:3]}***{key[-4:]}.", code="invalid_api_key")

    def take_fault(self, request: Request) -> Json | None:
        """Consume one use of the first queued fault matching the request (no yield inside: greenlet-safe)."""
        for i, fault in enumerate(self.faults):
            if fault_matches(fault, request):
                if fault["times"] > 0:
                    fault["times"] -= 1
                    if fault["times"] == 0:
                        del self.faults[i]
                return fault
        return None

    @staticmethod
    def queued(chunks: Iterable[bytes], fault: Json, stream: bool, environ: Environ) -> Iterator[bytes]:
        """DeepSeek while a request waits to be scheduled: blank lines (plain) or `: keep-alive` comments (stream)
        every `interval` seconds for `seconds`, then the answer. With "silent": true, the head alone, then
        nothing for `seconds`."""
        seconds, interval = float(fault.get("seconds", 1.0)), float(fault.get("interval", 0.5)) or 0.5
        if fault.get("silent"):
            environ["mock.write"](b"")
            gevent.sleep(seconds)
            yield from chunks
            return
        filler = b": keep-alive\n\n" if stream else b"\n"
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            yield filler
            gevent.sleep(min(interval, max(0.0, seconds - (time.monotonic() - started))))
        yield from chunks

    @staticmethod
    def reset_after(chunks: Iterable[bytes], after: int, environ: Environ) -> Iterator[bytes]:
        """Pass on the first `after` writes of a stream, then reset the connection."""
        for i, chunk in enumerate(chunks):
            if i >= after:
                break
            yield chunk
        abort_connection(environ)

    # -- endpoints ---------------------------------------------------------------------------------------------

    def chat_completions(self, request: Request, fault: Json | None) -> Response:
        """POST /v1/chat/completions: "Mock answer to: <last user text>", or a tool call when asked for one."""
        body = require_object(request.body)
        model = require_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise MockError(400, "Missing required parameter: 'messages'.", param="messages")
        n = positive_int(body, "n") or 1
        max_tokens = positive_int(body, "max_completion_tokens") or positive_int(body, "max_tokens")
        question = last_user_text(messages)
        prompt_tokens = sum(count_tokens(message_text(m.get("content"))) + 3 for m in messages if isinstance(m, dict))
        tool = chosen_tool(body) if "call a tool" in question.lower() else None
        if tool is not None:
            answer: Answer = ToolCallAnswer(tool["function"]["name"], tool_arguments(tool))
        else:
            answer = TextAnswer.cut("Mock answer to: " + question, max_tokens, fault)
        logprobs = None
        if body.get("logprobs") is True:
            logprobs = body.get("top_logprobs") if isinstance(body.get("top_logprobs"), int) else 0
        reply = ChatReply(model, n, prompt_tokens, answer, include_usage=wants_usage(body), logprobs=logprobs,
                          obfuscation=wants_obfuscation(body))
        if request.stream:
            return "200 OK", list(SSE_HEADERS), self.paced(reply.events(), fault)
        return json_response(200, reply.completion())

    def completions(self, request: Request, fault: Json | None) -> Response:
        """POST /v1/completions (legacy): "Mock completion of: <prompt>"."""
        body = require_object(request.body)
        model = require_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt else ""
        if isinstance(prompt, list):  # token ids
            prompt = " ".join(str(t) for t in prompt)
        if not isinstance(prompt, str):
            raise MockError(400, "Missing required parameter: 'prompt'.", param="prompt")
        n = positive_int(body, "n") or 1
        answer = TextAnswer.cut("Mock completion of: " + prompt, positive_int(body, "max_tokens"), fault)
        reply = TextCompletionReply(model, n, count_tokens(prompt), answer, include_usage=wants_usage(body))
        if request.stream:
            return "200 OK", list(SSE_HEADERS), self.paced(reply.events(), fault)
        return json_response(200, reply.completion())

    def embeddings(self, request: Request, fault: Json | None) -> Response:
        """POST /v1/embeddings: one deterministic unit vector per input, as floats or base64 float32."""
        body = require_object(request.body)
        model = require_model(body)
        texts = embedding_inputs(body.get("input"))
        dimensions = positive_int(body, "dimensions") or DEFAULT_DIMENSIONS
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise MockError(400, f"Invalid 'encoding_format': {encoding!r}.", param="encoding_format")
        data = []
        for i, text in enumerate(texts):
            vector = embed(text, dimensions)
            data.append(
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": float32_base64(vector) if encoding == "base64" else vector,
                }
            )
        tokens = sum(count_tokens(t) for t in texts)
        return json_response(
            200,
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    def list_models(self, request: Request, fault: Json | None) -> Response:
        """GET /v1/models."""
        return json_response(200, {"object": "list", "data": [model_object(m) for m in self.models]})

    def get_model(self, request: Request, fault: Json | None) -> Response:
        """GET /v1/models/{id}: the model, or OpenAI's 404 model_not_found."""
        model = request.path[len("/models/") :]
        if model not in self.models:
            raise MockError(404, f"The model '{model}' does not exist", code="model_not_found", param="model")
        return json_response(200, model_object(model))

    def paced(self, events: Iterable[bytes], fault: Json | None) -> Iterator[bytes]:
        """Yield stream events one write each, with the chunk delay (or a slow_chunks fault's) between them."""
        slow = fault is not None and fault["kind"] == "slow_chunks"
        delay = float(fault.get("delay", 0.5)) if slow else self.config.chunk_delay
        for i, event in enumerate(events):
            if i and delay > 0:
                gevent.sleep(delay)
            yield event

    # -- control API -------------------------------------------------------------------------------------------

    def control(self, method: str, path: str, body: Any) -> Response:
        """The /_mock/ endpoints tests use to script faults and read what the upstream received."""
        if (method, path) == ("POST", "/_mock/faults"):
            faults = body.get("faults") if isinstance(body, dict) else body
            if not isinstance(faults, list):
                raise MockError(400, 'expected {"faults": [...]}')
            self.faults.extend([validate_fault(f) for f in faults])
            return json_response(200, {"faults": self.faults})
        if (method, path) == ("GET", "/_mock/faults"):
            return json_response(200, {"faults": self.faults})
        if (method, path) == ("DELETE", "/_mock/faults"):
            self.faults.clear()
            return json_response(200, {"faults": []})
        if (method, path) == ("GET", "/_mock/requests"):
            return json_response(200, {"requests": list(self.requests)})
        if (method, path) == ("DELETE", "/_mock/requests"):
            self.requests.clear()
            return json_response(200, {"requests": []})
        if (method, path) == ("POST", "/_mock/reset"):
            self.requests.clear()
            self.faults.clear()
            self.config = Config(**vars(self.initial))
            return json_response(200, {"config": vars(self.config)})
        if (method, path) == ("POST", "/_mock/config"):
            self.configure(body)
        if (method, path) in (("POST", "/_mock/config"), ("GET", "/_mock/config")):
            return json_response(200, {"config": vars(self.config)})
        raise MockError(404, f"Invalid URL ({method} {path})")

    def configure(self, body: Any) -> None:
        """Change latency / chunk_delay at run time; unknown fields are a 400 so typos do not pass silently."""
        if not isinstance(body, dict) or set(body) - {"latency", "chunk_delay"}:
            raise MockError(400, 'expected {"latency": seconds, "chunk_delay": seconds}')
        for name, value in body.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise MockError(400, f"'{name}' must be a number of seconds >= 0")
            setattr(self.config, name, float(value))


# ---------------------------------------------------------------------------------------------------------------
# Answers and their serialisations.


@dataclass
class TextAnswer:
    """A text answer and why it ended."""

    text: str
    finish_reason: str = "stop"

    @classmethod
    def cut(cls, text: str, max_tokens: int | None, fault: Json | None) -> "TextAnswer":
        """The answer cut by max_tokens, or by a "length" fault (to about half), with finish_reason "length"."""
        size = count_tokens(text)
        if fault and fault["kind"] == "length":
            max_tokens = min(max_tokens or size, max(1, size // 2))
        if max_tokens is not None and max_tokens < size:
            return cls(truncate(text, max_tokens), "length")
        return cls(text)

    @property
    def tokens(self) -> int:
        return count_tokens(self.text)


@dataclass
class ToolCallAnswer:
    """A single function call, as OpenAI answers when a tool is called."""

    name: str
    arguments: str
    finish_reason: str = "tool_calls"

    def __post_init__(self) -> None:
        self.call_id = "call_" + secrets.token_hex(12)

    @property
    def tokens(self) -> int:
        return count_tokens(self.name + " " + self.arguments)


Answer = TextAnswer | ToolCallAnswer


class StreamFrames:
    """A stream's chunk envelope, encoded once: each chunk then only encodes its own choices.

    Streams cost one JSON encoding per chunk; keeping that to the small `choices` list keeps the mock cheap as the
    zero point of the latency benchmark.
    """

    def __init__(self, envelope: Json, *, usage_null: bool, obfuscation: bool = False) -> None:
        encoded = encode(envelope)  # '{...}' without "choices", which goes last
        self.head = b"data: " + encoded[:-1] + b',"choices":'
        # OpenAI sends "usage": null on every chunk but the last when the stream asked for usage.
        self.usage_null = b',"usage":null' if usage_null else b""
        self.tail = self.usage_null + b"}\n\n"
        self.obfuscation = obfuscation

    def event(self, choices: list[Json]) -> bytes:
        if self.obfuscation:  # OpenAI's padding of delta chunks, last: random characters, a random number of them
            pad = secrets.token_urlsafe(1 + secrets.randbelow(12)).encode()
            return self.head + encode(choices) + self.usage_null + b',"obfuscation":"' + pad + b'"}\n\n'
        return self.head + encode(choices) + self.tail

    def usage_event(self, usage: Json) -> bytes:
        return self.head + b'[],"usage":' + encode(usage) + b"}\n\n"

    def event_with_usage(self, choices: list[Json], usage: Json) -> bytes:
        return self.head + encode(choices) + b',"usage":' + encode(usage) + b"}\n\n"


def usage_of(prompt_tokens: int, completion_tokens: int) -> Json:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def deepseek_usage(usage: Json, reasoning_tokens: int) -> Json:
    """DeepSeek's usage: OpenAI's three counts plus its context-cache split (hit + miss = prompt) and, for the
    reasoner, the reasoning tokens inside completion_tokens."""
    return {
        **usage,
        "prompt_tokens_details": {"cached_tokens": 0},
        "prompt_cache_hit_tokens": 0,
        "prompt_cache_miss_tokens": usage["prompt_tokens"],
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def token_logprobs(text: str, top: int) -> list[Json]:
    """OpenAI's logprobs.content for a text: one entry per piece (the mock's token), with `top` alternatives."""
    entries = []
    for i, piece in enumerate(pieces(text) if text else []):
        logprob = -round(0.01 * (i % 7 + 1), 4)
        tokens = [piece, *(f"alt{k}" for k in range(1, top))][:top]
        alternatives = [{"token": t, "logprob": logprob - k, "bytes": list(t.encode())} for k, t in enumerate(tokens)]
        entries.append({"token": piece, "logprob": logprob, "bytes": list(piece.encode()),
                        "top_logprobs": alternatives})
    return entries


class ChatReply:
    """One chat completion, rendered whole (chat.completion) or as SSE chunks (chat.completion.chunk).

    Model-shaped like the providers: `deepseek-*` models answer with DeepSeek's usage (context-cache split) and,
    streamed, put usage on the last chunk whether or not it was asked for; `deepseek-reasoner` thinks first
    (`reasoning_content`, streamed before the content). `logprobs: true` (+ `top_logprobs`) adds OpenAI's logprobs.
    """

    def __init__(self, model: str, n: int, prompt_tokens: int, answer: Answer, *, include_usage: bool,
                 logprobs: int | None = None, obfuscation: bool = True) -> None:
        self.deepseek = model.startswith("deepseek")
        # DeepSeek's completion ids are bare UUIDs ("930c60df-bf64-41c9-a88e-3ec75f81e00e"), OpenAI's chatcmpl-...
        self.id = str(uuid.uuid4()) if self.deepseek else "chatcmpl-" + secrets.token_hex(12)
        self.obfuscation = obfuscation  # OpenAI-shaped streams pad their delta chunks unless asked not to
        self.created = int(time.time())
        self.model = model
        self.n = n
        self.answer = answer
        self.include_usage = include_usage
        self.reasoning = "Thinking about the question first." if model == "deepseek-reasoner" else None
        self.logprobs = logprobs  # None: not asked; else the number of top alternatives
        reasoning_tokens = count_tokens(self.reasoning) if self.reasoning else 0
        self.usage = usage_of(prompt_tokens, (answer.tokens + reasoning_tokens) * n)
        if self.deepseek:
            self.usage = deepseek_usage(self.usage, reasoning_tokens * n)

    def _message(self) -> Json:
        if isinstance(self.answer, ToolCallAnswer):
            call = {
                "id": self.answer.call_id,
                "type": "function",
                "function": {"name": self.answer.name, "arguments": self.answer.arguments},
            }
            message: Json = {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}
        else:
            message = {"role": "assistant", "content": self.answer.text, "refusal": None}
        if self.reasoning is not None:
            message["reasoning_content"] = self.reasoning
        return message

    def _logprobs(self, text: str) -> Json | None:
        if self.logprobs is None:
            return None
        return {"content": token_logprobs(text, self.logprobs), "refusal": None}

    def completion(self) -> Json:
        message = self._message()
        text = message.get("content") or ""
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": i, "message": message, "logprobs": self._logprobs(text),
                 "finish_reason": self.answer.finish_reason}
                for i in range(self.n)
            ],
            "usage": self.usage,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def _deltas(self) -> Iterator[tuple[Json, Json | None]]:
        """The deltas of one choice with their logprobs: role first, the reasoning, then the content (or the call's
        arguments) piece by piece."""
        if self.reasoning is not None:
            yield {"role": "assistant", "content": None, "reasoning_content": ""}, None
            for piece in pieces(self.reasoning):
                yield {"content": None, "reasoning_content": piece}, None
        if isinstance(self.answer, ToolCallAnswer):
            head = {
                "index": 0,
                "id": self.answer.call_id,
                "type": "function",
                "function": {"name": self.answer.name, "arguments": ""},
            }
            yield {"role": "assistant", "content": None, "tool_calls": [head], "refusal": None}, None
            for piece in pieces(self.answer.arguments):
                yield {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, None
            return
        if self.reasoning is None:
            yield {"role": "assistant", "content": "", "refusal": None}, None
        for piece in pieces(self.answer.text):
            delta: Json = {"content": piece}
            if self.reasoning is not None:
                delta["reasoning_content"] = None
            yield delta, self._logprobs(piece)

    def events(self) -> Iterator[bytes]:
        envelope = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        frames = StreamFrames(envelope, usage_null=self.include_usage and not self.deepseek,
                              obfuscation=self.obfuscation and not self.deepseek)
        for delta, logprobs in self._deltas():
            yield frames.event(
                [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": None} for i in range(self.n)]
            )
        finish = self.answer.finish_reason
        last = [{"index": i, "delta": {"content": ""} if self.deepseek else {}, "logprobs": None,
                 "finish_reason": finish} for i in range(self.n)]
        if self.deepseek:  # DeepSeek: usage rides on the last chunk, asked for or not
            yield frames.event_with_usage(last, self.usage)
        else:
            yield frames.event(last)
            if self.include_usage:
                yield frames.usage_event(self.usage)
        yield SSE_DONE


class TextCompletionReply:
    """One legacy completion (text_completion), whole or streamed."""

    def __init__(self, model: str, n: int, prompt_tokens: int, answer: TextAnswer, *, include_usage: bool) -> None:
        self.id = "cmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.model = model
        self.n = n
        self.answer = answer
        self.include_usage = include_usage
        self.usage = usage_of(prompt_tokens, answer.tokens * n)

    def _envelope(self) -> Json:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def completion(self) -> Json:
        finish = self.answer.finish_reason
        choices = [
            {"text": self.answer.text, "index": i, "logprobs": None, "finish_reason": finish} for i in range(self.n)
        ]
        return {**self._envelope(), "choices": choices, "usage": self.usage}

    def events(self) -> Iterator[bytes]:
        frames = StreamFrames(self._envelope(), usage_null=self.include_usage)
        for piece in pieces(self.answer.text):
            yield frames.event(
                [{"text": piece, "index": i, "logprobs": None, "finish_reason": None} for i in range(self.n)]
            )
        finish = self.answer.finish_reason
        yield frames.event([{"text": "", "index": i, "logprobs": None, "finish_reason": finish} for i in range(self.n)])
        if self.include_usage:
            yield frames.usage_event(self.usage)
        yield SSE_DONE


# ---------------------------------------------------------------------------------------------------------------
# Request parsing.


def read_json(environ: Environ) -> Any:
    """The request body as JSON (None when empty); invalid JSON is OpenAI's 400."""
    data = environ["wsgi.input"].read()
    if not data:
        return None
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MockError(400, _BAD_JSON) from exc


def require_object(body: Any) -> Json:
    """The body of a POST must be a JSON object."""
    if not isinstance(body, dict):
        raise MockError(400, _BAD_JSON)
    return body


def require_model(body: Json) -> str:
    """The request's model: a non-empty string, as every OpenAI endpoint requires."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise MockError(400, "you must provide a model parameter", param="model")
    return model


def wants_usage(body: Json) -> bool:
    """Whether a stream should end with a usage chunk (stream_options.include_usage)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def wants_obfuscation(body: Json) -> bool:
    """OpenAI pads each streamed delta chunk with an `obfuscation` field of random characters (a mitigation of
    side channels on payload sizes), on by default; `stream_options.include_obfuscation: false` turns it off."""
    options = body.get("stream_options")
    return not (isinstance(options, dict) and options.get("include_obfuscation") is False)


def embedding_inputs(value: Any) -> list[str]:
    """The texts to embed: a string, a list of strings, a token list, or a list of token lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return [" ".join(map(str, value))]
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
            return [" ".join(map(str, v)) for v in value]
    raise MockError(400, "'input' must be a string, a list of strings, or token lists.", param="input")


def model_object(model: str) -> Json:
    """A model entry as GET /v1/models lists it."""
    return {"id": model, "object": "model", "created": MODELS_CREATED, "owned_by": "mock"}


# ---------------------------------------------------------------------------------------------------------------
# Server.


class MockHandler(WSGIHandler):
    """pywsgi's handler, with Nagle off, and handing the connection's socket to the app for the reset fault."""

    def handle(self) -> None:
        # pywsgi sends the headers and the body in two writes: with Nagle on, the body waits for the client's
        # delayed ACK of the headers (~40 ms on Linux loopback), which would swamp every latency measurement.
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle()

    def get_environ(self) -> Environ:
        environ = super().get_environ()
        environ["mock.socket"] = self.socket
        return environ


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Mock OpenAI-compatible upstream (gevent, stdlib only).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100, help="0 picks a free port (printed)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer's first byte")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between stream chunks")
    parser.add_argument("--keys", default="", help="comma-separated accepted Bearer keys (default: any)")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model ids")
    parser.add_argument("--access-log", action="store_true", help="log every request to stderr")
    return parser.parse_args(argv)


def split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    app = MockUpstream(
        config=Config(latency=args.latency, chunk_delay=args.chunk_delay),
        keys=split_list(args.keys),
        models=split_list(args.models),
    )
    server = WSGIServer(
        (args.host, args.port), app, handler_class=MockHandler, backlog=2048, log="default" if args.access_log else None
    )
    server.start()
    host, port = server.address[:2]
    print(f"mock upstream listening on http://{host}:{port}", flush=True)

    def stop() -> None:
        server.stop(timeout=1)

    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop)
    server.serve_forever()  # returns once stop() has closed the listener
    return 0


if __name__ == "__main__":
    sys.exit(main())
