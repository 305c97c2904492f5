"""Server-sent events: watch an upstream stream as it passes, and replay a cached answer as one.

`StreamTap` never changes the bytes sent to the client; it parses them on the side so the gateway
knows, at the end, whether the answer finished cleanly, its usage, and the complete answer to cache.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

from app.api import CHAT, CLEAN_FINISH, COMPLETIONS

REPLAY_PIECE_CHARS = 64


def sse_event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def sse_error(message: str, error_type: str = "upstream_error", code: str | None = "stream_interrupted") -> bytes:
    """The last event of a stream that broke: clients see an error, never a truncation posing as success."""
    return sse_event({"error": {"message": message, "type": error_type, "param": None, "code": code}})


# What the tap and the replay know how to carry. Anything else with a value makes an answer unfollowable: it is
# passed on untouched on the miss, but never cached (a hit would come back without it).
_ANSWER_KEYS = frozenset({"id", "object", "created", "model", "choices", "usage", "system_fingerprint",
                          "service_tier"})
# `obfuscation`: OpenAI pads streamed delta chunks with random characters (`stream_options.include_obfuscation`,
# on by default) so their sizes do not give the tokens away. Padding, not content: the tap lets it by, and no
# answer or replay carries it (README, "Compatibility").
_CHUNK_KEYS = _ANSWER_KEYS | {"obfuscation"}
_CARRIED_KEYS = ("system_fingerprint", "service_tier")  # top-level fields every chunk of a replay repeats
_DELTA_KEYS = frozenset({"role", "content", "reasoning_content", "refusal", "tool_calls"})
_MESSAGE_KEYS = _DELTA_KEYS
_CHAT_CHOICE_KEYS = frozenset({"index", "delta", "message", "logprobs", "finish_reason"})
_TEXT_CHOICE_KEYS = frozenset({"index", "text", "logprobs", "finish_reason"})
_EMPTY = (None, [], {}, "")
# `"usage": null` as a member of a chunk object (never inside a string, where its quotes would be escaped).
_NULL_USAGE = re.compile(rb'\s*,\s*"usage"\s*:\s*null(?=\s*[,}])|(?<=[{,])\s*"usage"\s*:\s*null\s*,')
# `"usage": null` after another field, as compact JSON and as Python's json.dumps writes it: removed with a plain
# replace (the regex above, which also takes any spacing and a leading position, costs ~12 µs per chunk).
_NULL_USAGE_AFTER_A_FIELD = (b',"usage":null', b', "usage": null')


def _without_null_usage(event: bytes) -> bytes:
    """The event without its `"usage": null` (valid JSON puts only `,`, `}` or space after a `null`)."""
    for form in _NULL_USAGE_AFTER_A_FIELD:
        event = event.replace(form, b"")
    return _NULL_USAGE.sub(b"", event) if b'"usage"' in event else event


class _Choice:
    """One choice of a stream, assembled as its deltas go by."""

    __slots__ = ("role", "text", "reasoning", "refusal", "tool_calls", "logprobs", "finish_reason", "seen")

    def __init__(self) -> None:
        self.role = "assistant"
        self.text: list[str] = []
        self.reasoning: list[str] | None = None
        self.refusal: list[str] | None = None
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.logprobs: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.seen: set[str] = set()  # delta fields the upstream sent, even as null

    def add_logprobs(self, logprobs: Any, route: str) -> None:
        """Chat: `content`/`refusal` token lists, concatenated. Completions: parallel lists, concatenated."""
        if logprobs is None:
            return
        if not isinstance(logprobs, dict):
            raise TypeError("logprobs that are not an object")
        if self.logprobs is None:
            self.logprobs = {}
        for name, value in logprobs.items():
            if value is None:
                self.logprobs.setdefault(name, None)
            elif isinstance(value, list):
                held = self.logprobs.get(name)
                if held is None:
                    self.logprobs[name] = list(value)  # a list of our own, extended in place by later chunks
                else:
                    held.extend(value)
            else:
                raise TypeError("a logprobs field that is not a list")


class StreamTap:
    """Incremental parser of OpenAI chat/completions SSE, fed the raw bytes as they go by."""

    def __init__(self, route: str, *, strip_usage: bool = False, assemble: bool = True) -> None:
        self.route = route
        self.strip_usage = strip_usage  # the gateway asked for usage; the client did not
        # Assemble the answer for the cache. Without it (nothing will be stored: cache off, no-store, a fallback's
        # answer) only what accounting and tracing read is kept: usage, the first chunk, finish reasons, [DONE].
        self.assemble = assemble
        self._buffer = b""
        self.done = False
        self.errored = False
        self.usage: dict[str, Any] | None = None
        self.usage_with_choices = False  # usage came on a chunk with choices (DeepSeek), not a chunk of its own
        self._first: dict[str, Any] | None = None
        self._carried: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}

    @property
    def finish_reason(self) -> str | None:
        first = self._choices.get(0)
        return first.finish_reason if first is not None else None

    @property
    def finish_reasons(self) -> list[str | None]:
        return [self._choices[index].finish_reason for index in sorted(self._choices)]

    @property
    def first_chunk(self) -> dict[str, Any] | None:
        """The stream's first chunk (its `id` and `model`)."""
        return self._first

    def feed(self, data: bytes) -> bytes:
        """Take the bytes that arrived; give back the complete events to forward, in order."""
        self._buffer += data
        if b"\n\n" not in self._buffer and b"\r\n\r\n" not in self._buffer:
            return b""
        events = self._buffer.replace(b"\r\n", b"\n").split(b"\n\n")
        self._buffer = events.pop()
        return b"".join(self._forwarded(event) for event in events)

    def flush(self) -> bytes:
        """What is left when the upstream closed: a last event that lacked its blank line."""
        rest, self._buffer = self._buffer.strip(), b""
        return self._forwarded(rest) if rest else b""

    def _forwarded(self, event: bytes) -> bytes:
        """The event as the client gets it: as it came, unless the gateway added usage the client did not ask
        for; then the usage chunk is dropped and the `"usage": null` OpenAI puts on every other chunk removed,
        so the client sees the wire it asked for."""
        if not self._event(event):
            return b""
        if self.strip_usage and b'"usage"' in event:
            event = _without_null_usage(event)
        return event + b"\n\n"

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
            except (ValueError, TypeError, AttributeError, KeyError):
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
        choices = chunk.get("choices") or []
        if isinstance(chunk.get("usage"), dict):
            # Counted even when the chunk has a field the tap does not know: what was used does not change, and a
            # provider adding a field (as OpenAI did with `obfuscation`) must not stop token limits and budgets.
            self.usage = chunk["usage"]
            self.usage_with_choices = bool(choices)
        if _unknown(chunk, _CHUNK_KEYS):
            self.errored = True
            return
        if self._first is None:
            self._first = chunk
        if self.assemble:
            for name in _CARRIED_KEYS:
                if chunk.get(name) is not None:
                    self._carried[name] = chunk[name]
        for choice in choices:
            if not isinstance(choice, dict):
                raise TypeError("a choice that is not an object")
            if _unknown(choice, _CHAT_CHOICE_KEYS if self.route == CHAT else _TEXT_CHOICE_KEYS):
                raise TypeError("a choice field the replay cannot carry")
            index = choice.get("index", 0)
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError("a choice index that is not an integer")
            state = self._choices.get(index)
            if state is None:  # not setdefault: that would build a _Choice for every chunk
                state = self._choices[index] = _Choice()
            if choice.get("finish_reason"):
                state.finish_reason = choice["finish_reason"]
            if not self.assemble:  # the same checks either way, so usage counts the same; no answer to build
                continue
            state.add_logprobs(choice.get("logprobs"), self.route)
            if self.route == CHAT:
                self._delta(state, _object(choice.get("delta")))
            elif isinstance(choice.get("text"), str):
                state.text.append(choice["text"])

    def _delta(self, state: _Choice, delta: dict[str, Any]) -> None:
        if _unknown(delta, _DELTA_KEYS):
            raise TypeError("a delta field the replay cannot carry")
        state.seen.update(delta)
        role, content = delta.get("role"), delta.get("content")
        if isinstance(role, str):
            state.role = role
        if isinstance(content, str):
            state.text.append(content)
        reasoning, refusal = delta.get("reasoning_content"), delta.get("refusal")
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise TypeError("reasoning_content that is not a string")
            if state.reasoning is None:
                state.reasoning = []
            state.reasoning.append(reasoning)  # appended in place: a reasoner streams thousands of these
        if refusal is not None:
            if not isinstance(refusal, str):
                raise TypeError("refusal that is not a string")
            if state.refusal is None:
                state.refusal = []
            state.refusal.append(refusal)
        for call in delta.get("tool_calls") or []:
            call = _object(call)
            slot = state.tool_calls.setdefault(
                call.get("index", 0), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
            if call.get("id"):
                slot["id"] = call["id"]
            if call.get("type"):
                slot["type"] = call["type"]
            function = _object(call.get("function"))
            slot["function"]["name"] += function.get("name") or ""  # TypeError unless a string: caught above
            slot["function"]["arguments"] += function.get("arguments") or ""

    @property
    def clean(self) -> bool:
        """Finished as the upstream meant it to: every choice with a final reason worth caching, and `[DONE]`."""
        return (self.done and not self.errored and bool(self._choices)
                and all(c.finish_reason in CLEAN_FINISH for c in self._choices.values()))

    def answer(self) -> dict[str, Any] | None:
        """The non-streamed answer equivalent to what went by; None unless it was assembled and ended cleanly."""
        if not self.assemble or not self.clean or self._first is None:
            return None
        base = {"id": self._first.get("id"), "created": self._first.get("created"), "model": self._first.get("model")}
        choices = [self._assembled(index, self._choices[index]) for index in sorted(self._choices)]
        if self.route == CHAT:
            answer = {**base, "object": "chat.completion", "choices": choices}
        else:
            answer = {**base, "object": "text_completion", "choices": choices}
        if self.usage is not None:
            answer["usage"] = self.usage
        answer.update(self._carried)
        return answer

    def _assembled(self, index: int, state: _Choice) -> dict[str, Any]:
        text = "".join(state.text)
        if self.route != CHAT:
            return {"index": index, "text": text, "logprobs": state.logprobs, "finish_reason": state.finish_reason}
        message: dict[str, Any] = {"role": state.role, "content": text if text or not state.tool_calls else None}
        if state.reasoning is not None or "reasoning_content" in state.seen:
            message["reasoning_content"] = "".join(state.reasoning) if state.reasoning is not None else None
        if state.refusal is not None or "refusal" in state.seen:
            message["refusal"] = "".join(state.refusal) if state.refusal is not None else None
        if state.tool_calls:
            message["tool_calls"] = [state.tool_calls[i] for i in sorted(state.tool_calls)]
        return {"index": index, "message": message, "logprobs": state.logprobs, "finish_reason": state.finish_reason}


def replayable(answer: dict[str, Any], route: str) -> bool:
    """Whether `replay` (and a plain hit) can give back every field of this answer; what fails is not cached.

    Known fields only (or unknown ones without a value), a message per chat choice, and for legacy completions
    no logprobs (their character offsets are not re-cut faithfully).
    """
    if route not in (CHAT, COMPLETIONS):
        return True
    if _unknown(answer, _ANSWER_KEYS | {"error"}):
        return False
    choices = answer.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            return False
        if route == CHAT:
            message = choice.get("message")
            if _unknown(choice, _CHAT_CHOICE_KEYS) or not isinstance(message, dict) or _unknown(message, _MESSAGE_KEYS):
                return False
            if not isinstance(choice.get("logprobs") or {}, dict):
                return False
        elif _unknown(choice, _TEXT_CHOICE_KEYS) or choice.get("logprobs") is not None:
            return False
    return True


def _unknown(obj: dict[str, Any], known: frozenset[str]) -> bool:
    """A field outside `known` that carries a value (null, empty and "" carry nothing a client would miss)."""
    extra = obj.keys() - known  # nearly always empty: one set operation per object of every streamed chunk
    return bool(extra) and any(obj[key] not in _EMPTY for key in extra)


def replay(answer: dict[str, Any], route: str, *, include_usage: bool) -> Iterator[bytes]:
    """A cached answer as a fresh stream: per choice the role, reasoning, content (with its logprobs), refusal,
    tool calls and finish chunks; then usage where the provider puts it, and `[DONE]`.

    Usage where the provider puts it: an answer with DeepSeek's usage shape carries it on its finish chunk, asked
    for or not (as DeepSeek streams it, so a hit's chunks are laid out as the miss's were); any other answer as a
    chunk of its own when the client asked for it (`stream_options.include_usage`, with `"usage": null` on the
    other chunks, as OpenAI sends it), else not at all.
    """
    completion_id = _fresh_id(answer.get("id"), route)
    created = int(time.time())
    envelope: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk" if route == CHAT
                                else "text_completion", "created": created, "model": answer.get("model")}
    for name in _CARRIED_KEYS:
        if answer.get(name) is not None:
            envelope[name] = answer[name]
    usage = answer.get("usage")
    usage_on_last = _deepseek_usage(usage)
    usage_chunk = include_usage and bool(usage) and not usage_on_last
    null_usage = {"usage": None} if include_usage and not usage_on_last else {}

    choices = answer.get("choices") or [{}]
    for n, choice in enumerate(choices):
        pieces = list(_replay_choice(choice, route))
        for i, piece in enumerate(pieces):
            last = n == len(choices) - 1 and i == len(pieces) - 1
            extra = {"usage": usage} if last and usage_on_last else null_usage
            yield sse_event({**envelope, "choices": [piece], **extra})
    if usage_chunk:
        yield sse_event({**envelope, "choices": [], "usage": usage})
    yield sse_event("[DONE]")


def _fresh_id(stored: Any, route: str) -> str:
    """A new completion id in the form the provider gave the stored one: DeepSeek's are bare UUIDs, OpenAI's
    `chatcmpl-` (chat) or `cmpl-` (completions) and hex; anything else gets OpenAI's form."""
    if isinstance(stored, str):
        try:
            canonical = str(uuid.UUID(stored)) == stored.lower()  # not the other spellings uuid.UUID takes
        except ValueError:
            canonical = False
        if canonical:
            return str(uuid.uuid4())
    return ("chatcmpl-" if route == CHAT else "cmpl-") + uuid.uuid4().hex


def _deepseek_usage(usage: Any) -> bool:
    return isinstance(usage, dict) and "prompt_cache_hit_tokens" in usage


def _replay_choice(choice: dict[str, Any], route: str) -> Iterator[dict[str, Any]]:
    """One choice of a cached answer as stream choices; an `n > 1` answer replays each under its index."""
    index = choice.get("index", 0)
    finish = choice.get("finish_reason") or "stop"
    logprobs = choice.get("logprobs")
    if route != CHAT:
        for piece in _pieces(choice.get("text")):
            yield {"index": index, "text": piece, "logprobs": None, "finish_reason": None}
        yield {"index": index, "text": "", "logprobs": None, "finish_reason": finish}
        return
    message = choice.get("message") or {}
    # The first delta as providers send it: content "" when text follows, null before reasoning or a tool call.
    reasoning = message.get("reasoning_content")
    head: dict[str, Any] = {"role": message.get("role", "assistant"),
                            "content": "" if isinstance(message.get("content"), str) and not reasoning else None}
    if "reasoning_content" in message:
        head["reasoning_content"] = "" if reasoning else None
    if "refusal" in message:
        head["refusal"] = None
    yield {"index": index, "delta": head, "logprobs": None, "finish_reason": None}
    for piece in _pieces(message.get("reasoning_content")):
        yield {"index": index, "delta": {"content": None, "reasoning_content": piece}, "logprobs": None,
               "finish_reason": None}
    for name in ("content", "refusal"):
        tokens = (logprobs or {}).get(name) if isinstance(logprobs, dict) else None
        for piece, piece_logprobs in _with_logprobs(message.get(name), tokens):
            chunk_logprobs = None
            if piece_logprobs is not None:
                chunk_logprobs = {**dict.fromkeys(logprobs), name: piece_logprobs}  # the fields it had
            yield {"index": index, "delta": {name: piece}, "logprobs": chunk_logprobs, "finish_reason": None}
    for i, call in enumerate(message.get("tool_calls") or []):
        yield {"index": index, "delta": {"tool_calls": [{"index": i, **call}]}, "logprobs": None,
               "finish_reason": None}
    yield {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}


def _with_logprobs(text: Any, tokens: Any) -> Iterator[tuple[str, list[Any] | None]]:
    """Text pieces, each with the logprobs of its tokens: one piece per token when the tokens spell the text
    (as the provider streamed it), else the text in fixed pieces with every token on the first."""
    if not isinstance(text, str):
        return
    if isinstance(tokens, list) and tokens and all(isinstance(t, dict) and isinstance(t.get("token"), str)
                                                   for t in tokens):
        if "".join(t["token"] for t in tokens) == text:
            for token in tokens:
                yield token["token"], [token]
            return
        for i, piece in enumerate(_pieces(text)):
            yield piece, tokens if i == 0 else []
        return
    for piece in _pieces(text):
        yield piece, None


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
