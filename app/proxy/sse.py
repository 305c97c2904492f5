"""Server-sent events: watch an upstream stream as it passes, and replay a cached answer as one.

`StreamTap` never changes the bytes sent to the client; it parses them on the side so the gateway
knows, at the end, whether the answer finished cleanly, its usage, and the complete answer to cache.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from app.proxy.validation import CHAT

CLEAN_FINISH = frozenset({"stop", "tool_calls", "function_call"})
REPLAY_PIECE_CHARS = 64


def sse_event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def sse_error(message: str, error_type: str = "upstream_error", code: str | None = "stream_interrupted") -> bytes:
    """The last event of a stream that broke: clients see an error, never a truncation posing as success."""
    return sse_event({"error": {"message": message, "type": error_type, "param": None, "code": code}})


class StreamTap:
    """Incremental parser of OpenAI chat/completions SSE, fed the raw bytes as they go by."""

    def __init__(self, route: str, *, strip_usage: bool = False) -> None:
        self.route = route
        self.strip_usage = strip_usage  # the gateway asked for usage; the client did not
        self._buffer = b""
        self.done = False
        self.errored = False
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self._first: dict[str, Any] | None = None
        self._text: list[str] = []
        self._role = "assistant"
        self._tool_calls: dict[int, dict[str, Any]] = {}
        self._extra_choices = False

    def feed(self, data: bytes) -> bytes:
        """Take the bytes that arrived; give back the complete events to forward, in order."""
        self._buffer += data
        if b"\n\n" not in self._buffer and b"\r\n\r\n" not in self._buffer:
            return b""
        events = self._buffer.replace(b"\r\n", b"\n").split(b"\n\n")
        self._buffer = events.pop()
        return b"".join(event + b"\n\n" for event in events if self._event(event))

    def flush(self) -> bytes:
        """What is left when the upstream closed: a last event that lacked its blank line."""
        rest, self._buffer = self._buffer.strip(), b""
        return rest + b"\n\n" if rest and self._event(rest) else b""

    def _event(self, event: bytes) -> bool:
        """Parse one event; False when it must not reach the client (the usage chunk it did not ask for)."""
        forward = True
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                continue
            try:
                chunk = json.loads(data)
                self._chunk(chunk)
            except (ValueError, TypeError, AttributeError):
                # Not the shape OpenAI sends: the bytes still go to the client untouched (this is a tap, not
                # a filter), but an answer the gateway could not follow is never cached or trusted for usage.
                self.errored = True
                continue
            if self.strip_usage and isinstance(chunk, dict) and chunk.get("usage") and not chunk.get("choices"):
                forward = False
        return forward

    def _chunk(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            self.errored = True
            return
        if "error" in chunk:
            self.errored = True
            return
        if self._first is None:
            self._first = chunk
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                raise TypeError("a choice that is not an object")
            if choice.get("index", 0) != 0:
                self._extra_choices = True
                continue
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            if self.route == CHAT:
                self._delta(_object(choice.get("delta")))
            elif isinstance(choice.get("text"), str):
                self._text.append(choice["text"])

    def _delta(self, delta: dict[str, Any]) -> None:
        if isinstance(delta.get("role"), str):
            self._role = delta["role"]
        if isinstance(delta.get("content"), str):
            self._text.append(delta["content"])
        for call in delta.get("tool_calls") or []:
            call = _object(call)
            slot = self._tool_calls.setdefault(
                call.get("index", 0), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
            if call.get("id"):
                slot["id"] = call["id"]
            function = _object(call.get("function"))
            slot["function"]["name"] += function.get("name") or ""  # TypeError unless a string: caught above
            slot["function"]["arguments"] += function.get("arguments") or ""

    @property
    def clean(self) -> bool:
        """Finished as the upstream meant it to: a final reason worth caching and `[DONE]`."""
        return self.done and not self.errored and not self._extra_choices and self.finish_reason in CLEAN_FINISH

    def answer(self) -> dict[str, Any] | None:
        """The non-streamed answer equivalent to what went by; None unless the stream ended cleanly."""
        if not self.clean or self._first is None:
            return None
        text = "".join(self._text)
        base = {"id": self._first.get("id"), "created": self._first.get("created"), "model": self._first.get("model")}
        if self.route == CHAT:
            message: dict[str, Any] = {"role": self._role, "content": text if text or not self._tool_calls else None}
            if self._tool_calls:
                message["tool_calls"] = [self._tool_calls[i] for i in sorted(self._tool_calls)]
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}
            answer = {**base, "object": "chat.completion", "choices": [choice]}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish_reason}
            answer = {**base, "object": "text_completion", "choices": [choice]}
        if self.usage is not None:
            answer["usage"] = self.usage
        return answer


def replay(answer: dict[str, Any], route: str, *, include_usage: bool) -> Iterator[bytes]:
    """A cached answer as a fresh stream: role chunk, content pieces, finish chunk, usage, `[DONE]`."""
    completion_id = ("chatcmpl-" if route == CHAT else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    model = answer.get("model")
    obj = "chat.completion.chunk" if route == CHAT else "text_completion"

    def chunk(choice: dict[str, Any]) -> bytes:
        return sse_event({"id": completion_id, "object": obj, "created": created, "model": model,
                          "choices": [choice]})

    for choice in answer.get("choices") or [{}]:
        yield from (chunk(piece) for piece in _replay_choice(choice, route))
    if include_usage and answer.get("usage"):
        yield sse_event({"id": completion_id, "object": obj, "created": created, "model": model, "choices": [],
                         "usage": answer["usage"]})
    yield sse_event("[DONE]")


def _replay_choice(choice: dict[str, Any], route: str) -> Iterator[dict[str, Any]]:
    """One choice of a cached answer as stream choices; an `n > 1` answer replays each under its index."""
    index = choice.get("index", 0)
    finish = choice.get("finish_reason") or "stop"
    if route == CHAT:
        message = choice.get("message") or {}
        yield {"index": index, "delta": {"role": message.get("role", "assistant"), "content": ""},
               "logprobs": None, "finish_reason": None}
        for piece in _pieces(message.get("content")):
            yield {"index": index, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}
        for i, call in enumerate(message.get("tool_calls") or []):
            yield {"index": index, "delta": {"tool_calls": [{"index": i, **call}]}, "logprobs": None,
                   "finish_reason": None}
        yield {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}
    else:
        for piece in _pieces(choice.get("text")):
            yield {"index": index, "text": piece, "logprobs": None, "finish_reason": None}
        yield {"index": index, "text": "", "logprobs": None, "finish_reason": finish}


def _object(value: Any) -> dict[str, Any]:
    """A JSON object the stream may omit (None -> {}); anything else is a shape the tap cannot follow."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError("expected a JSON object")
    return value


def _pieces(text: Any) -> Iterator[str]:
    if not isinstance(text, str):
        return
    for start in range(0, len(text), REPLAY_PIECE_CHARS):
        yield text[start : start + REPLAY_PIECE_CHARS]
