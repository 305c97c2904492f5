"""StreamTap (watching an upstream stream go by) and replay (a cached answer as a stream)."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from app.api import CHAT, COMPLETIONS
from app.proxy.sse import StreamTap, replay, sse_error

USAGE = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}


def event(payload: dict[str, Any] | str) -> bytes:
    return b"data: " + (payload if isinstance(payload, str) else json.dumps(payload)).encode() + b"\n\n"


def chat_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1700000000, "model": "mock-gpt",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


def usage_chunk() -> dict[str, Any]:
    return {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1700000000, "model": "mock-gpt",
            "choices": [], "usage": USAGE}


def chat_stream(words: list[str], *, finish: str = "stop", usage: bool = True, done: bool = True) -> bytes:
    out = event(chat_chunk({"role": "assistant", "content": ""}, usage=None))
    for word in words:
        out += event(chat_chunk({"content": word}, usage=None))
    out += event(chat_chunk({}, finish, usage=None))
    if usage:
        out += event(usage_chunk())
    if done:
        out += event("[DONE]")
    return out


def tool_stream() -> bytes:
    head = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    out = event(chat_chunk({"role": "assistant", "content": None, "tool_calls": [head]}))
    for piece in ['{"city": ', '"Paris"}']:
        out += event(chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
    out += event(chat_chunk({}, "tool_calls"))
    out += event(usage_chunk())
    return out + event("[DONE]")


def tap_all(data: bytes, route: str = CHAT, **kwargs: Any) -> tuple[StreamTap, bytes]:
    tap = StreamTap(route, **kwargs)
    out = tap.feed(data) + tap.flush()
    return tap, out


def parse_events(data: bytes) -> list[Any]:
    events = []
    for block in data.decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_clean_chat_stream_is_reconstructed_as_a_completion() -> None:
    """A clean stream gives the equivalent chat.completion: joined content, finish reason, usage."""
    tap, out = tap_all(chat_stream(["Hello ", "there ", "world"]))
    assert tap.clean
    assert out == chat_stream(["Hello ", "there ", "world"])  # bytes pass through unchanged
    answer = tap.answer()
    assert answer["object"] == "chat.completion"
    assert answer["id"] == "chatcmpl-up" and answer["model"] == "mock-gpt"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "Hello there world"}
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"] == USAGE
    assert tap.usage == USAGE


def test_tool_call_stream_is_reconstructed() -> None:
    """Tool-call deltas are joined into one call with its id, name and full arguments."""
    tap, _ = tap_all(tool_stream())
    message = tap.answer()["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert tap.answer()["choices"][0]["finish_reason"] == "tool_calls"


def test_completions_stream_is_reconstructed() -> None:
    """A legacy completions stream gives a text_completion with the joined text."""
    chunks = [{"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
               "choices": [{"index": 0, "text": t, "logprobs": None, "finish_reason": f}]}
              for t, f in [("Once ", None), ("upon", None), ("", "stop")]]
    tap, _ = tap_all(b"".join(event(c) for c in chunks) + event("[DONE]"), COMPLETIONS)
    answer = tap.answer()
    assert answer["object"] == "text_completion"
    assert answer["choices"][0]["text"] == "Once upon"


@pytest.mark.parametrize("data", [
    pytest.param(chat_stream(["Hi"], done=False), id="no-done"),
    pytest.param(chat_stream(["Hi"])[:-30], id="truncated"),
    pytest.param(chat_stream(["Hi"], finish="length"), id="length"),
    pytest.param(chat_stream(["Hi"], finish="content_filter"), id="content-filter"),
    pytest.param(event(chat_chunk({"content": "Hi"})) + sse_error("boom") + event("[DONE]"), id="error-event"),
    pytest.param(event(chat_chunk({"content": "Hi"})) + b"data: {not json\n\n" + chat_stream([]), id="bad-json"),
    pytest.param(event(chat_chunk({"content": "Hi"}, "stop") | {"choices": [
        {"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"},
        {"index": 1, "delta": {"content": "b"}, "finish_reason": "length"}]}) + event("[DONE]"), id="n-2-one-cut"),
    pytest.param(event(chat_chunk({"content": "Hi", "audio": {"id": "a1"}})) + chat_stream(["Hi"]),
                 id="unknown-delta-field"),
    pytest.param(event({"choices": [1]}) + chat_stream(["Hi"]), id="choice-not-object"),
    pytest.param(event({"choices": [{"index": 0, "delta": "Hi"}]}) + chat_stream(["Hi"]), id="delta-not-object"),
    pytest.param(event(chat_chunk({"tool_calls": ["x"]})) + chat_stream(["Hi"]), id="tool-call-not-object"),
    pytest.param(event(chat_chunk({"tool_calls": [{"function": {"name": 5}}]})) + chat_stream(["Hi"]),
                 id="tool-name-not-string"),
    pytest.param(event(chat_chunk({"tool_calls": [{"index": [0]}]})) + chat_stream(["Hi"]), id="index-unhashable"),
])
def test_unfinished_or_failed_stream_is_not_clean(data: bytes) -> None:
    """Truncated, cut by length, errored, misshapen or carrying fields a replay would lose: no answer to cache; whatever
    the shape, every event still reaches the client unchanged (the tap never cuts a stream it cannot follow)."""
    tap, out = tap_all(data)
    assert not tap.clean
    assert tap.answer() is None
    assert out.replace(b"\n\n", b"") == data.replace(b"\n\n", b"")


@pytest.mark.parametrize("seed", range(5))
def test_events_split_at_arbitrary_byte_boundaries(seed: int) -> None:
    """Bytes arriving in random pieces (even mid-line, mid-UTF-8) give the same events and answer."""
    data = chat_stream(["Grüße ", "aus ", "Köln ", "🙂"])
    rng = random.Random(seed)
    tap = StreamTap(CHAT)
    out, pos = b"", 0
    while pos < len(data):
        step = rng.randint(1, 9)
        out += tap.feed(data[pos:pos + step])
        pos += step
    out += tap.flush()
    assert out == data
    assert tap.answer()["choices"][0]["message"]["content"] == "Grüße aus Köln 🙂"


def test_one_byte_at_a_time_with_crlf_line_endings() -> None:
    """CRLF-separated events fed one byte at a time are still parsed and forwarded whole."""
    data = chat_stream(["a ", "b"]).replace(b"\n", b"\r\n")
    tap = StreamTap(CHAT)
    out = b"".join(tap.feed(data[i:i + 1]) for i in range(len(data))) + tap.flush()
    assert tap.clean
    assert len(parse_events(out)) == len(parse_events(chat_stream(["a ", "b"])))


def test_last_event_without_blank_line_is_flushed() -> None:
    """An upstream that closes right after `data: [DONE]` without the blank line still completes."""
    data = chat_stream(["x"]).rstrip(b"\n")
    tap = StreamTap(CHAT)
    out = tap.feed(data)
    out += tap.flush()
    assert tap.clean
    assert out.endswith(b"data: [DONE]\n\n")


def test_strip_usage_removes_only_the_usage_only_chunk() -> None:
    """With strip_usage the usage-only chunk is dropped and counted; every other event passes."""
    data = chat_stream(["Hi ", "you"])
    tap, out = tap_all(data, strip_usage=True)
    kept = parse_events(out)
    assert all(e == "[DONE]" or e["choices"] for e in kept)
    assert len(kept) == len(parse_events(data)) - 1
    assert kept[-1] == "[DONE]"
    assert tap.usage == USAGE
    assert tap.answer()["usage"] == USAGE


@pytest.mark.parametrize("assemble", [True, False])
def test_a_stream_the_tap_cannot_follow_is_not_cached_but_its_usage_counts(assemble: bool) -> None:
    """Chunks with a field the gateway does not know (and could not replay) are passed on, never cached, and their
    usage still counted: the same with the cache off as on, so what a tenant is charged does not depend on the
    cache, and a provider adding a field does not switch off token limits and budgets."""
    data = b"".join(event({**chat_chunk({"content": "Hi"}, "stop"), "moderation": "x"}) for _ in range(2))
    data += event({**usage_chunk(), "moderation": "x"}) + event("[DONE]")
    tap, out = tap_all(data, assemble=assemble)
    assert out == data
    assert (tap.usage, tap.finish_reasons, tap.answer()) == (USAGE, [], None)


@pytest.mark.parametrize("strip_usage", [False, True])
def test_openai_obfuscation_padding_is_passed_on_and_the_answer_still_assembled(strip_usage: bool) -> None:
    """OpenAI pads every delta chunk with `obfuscation` (random characters, on by default): the client gets the
    chunks as they came, usage is counted, and the answer is assembled (cached) without the padding."""
    data = b"".join(event(chat_chunk(delta, finish, usage=None, obfuscation=pad)) for delta, finish, pad in (
        ({"role": "assistant", "content": ""}, None, "aB3"), ({"content": "Hello"}, None, "Zq9x_1"),
        ({}, "stop", "k")))
    data += event(usage_chunk()) + event("[DONE]")
    tap, out = tap_all(data, strip_usage=strip_usage)
    forwarded = parse_events(out)
    assert [chunk["obfuscation"] for chunk in forwarded if isinstance(chunk, dict) and chunk["choices"]] == \
        ["aB3", "Zq9x_1", "k"]
    assert tap.usage == USAGE and tap.finish_reasons == ["stop"]
    answer = tap.answer()
    assert answer is not None and "obfuscation" not in answer
    assert answer["choices"][0]["message"]["content"] == "Hello"


@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")])
@pytest.mark.parametrize("first", [False, True])
def test_strip_usage_removes_usage_null_wherever_it_stands(separators: tuple[str, str], first: bool) -> None:
    """OpenAI puts `"usage": null` on every chunk once usage is asked for: a client that did not ask never sees it,
    whatever the spacing or position, and a string that merely contains those words is left alone."""
    chunk = chat_chunk({"content": 'say ,"usage":null and , "usage": null'})
    chunk = {"usage": None, **chunk} if first else {**chunk, "usage": None}
    data = b"data: " + json.dumps(chunk, separators=separators).encode() + b"\n\n" + event("[DONE]")
    _, out = tap_all(data, strip_usage=True)
    kept = parse_events(out)[0]
    assert "usage" not in kept
    assert kept["choices"][0]["delta"]["content"] == 'say ,"usage":null and , "usage": null'


def test_without_strip_usage_the_usage_chunk_is_forwarded() -> None:
    """A client that asked for usage gets the usage-only chunk."""
    _, out = tap_all(chat_stream(["Hi"]), strip_usage=False)
    assert {"choices": [], "usage": USAGE}.items() <= parse_events(out)[-2].items()


@pytest.mark.parametrize("strip_usage", [True, False])
def test_a_tap_that_assembles_nothing_passes_the_same_wire_and_still_counts(strip_usage: bool) -> None:
    """Nothing will be stored (cache off, no-store): the client gets the same bytes, and accounting and tracing
    still get the usage, the finish reasons and [DONE]; there is no answer to cache."""
    data = chat_stream(["Hi ", "you"])
    full, full_out = tap_all(data, strip_usage=strip_usage)
    light, light_out = tap_all(data, strip_usage=strip_usage, assemble=False)
    assert light_out == full_out
    assert (light.usage, light.finish_reasons, light.done) == (USAGE, ["stop"], True)
    assert light.first_chunk is not None and light.first_chunk["model"] == "mock-gpt"
    assert full.answer() is not None and light.answer() is None


def answer_from(data: bytes) -> dict[str, Any]:
    tap, _ = tap_all(data)
    answer = tap.answer()
    assert answer is not None
    return answer


@pytest.mark.parametrize("include_usage", [True, False])
def test_replay_is_a_valid_stream_with_fresh_ids(include_usage: bool) -> None:
    """A replayed answer parses as chunks sharing one fresh id, and ends with [DONE]."""
    answer = answer_from(chat_stream(["word "] * 100))  # longer than one replay piece
    first, second = b"".join(replay(answer, CHAT, include_usage=include_usage)), b"".join(
        replay(answer, CHAT, include_usage=include_usage))
    events = parse_events(first)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and "chatcmpl-up" not in ids
    assert ids.isdisjoint(c["id"] for c in parse_events(second)[:-1])
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "mock-gpt" for c in chunks)
    usage_chunks = [c for c in chunks if not c["choices"]]
    assert usage_chunks == ([{**chunks[-1], "usage": USAGE}] if include_usage else [])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "word " * 100


@pytest.mark.parametrize(("stored", "form"), [
    ("3f1e9a4c-2b7d-4c8e-9a1f-5d6e7f8a9b0c", r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"),
    ("chatcmpl-abc123", r"chatcmpl-[0-9a-f]{32}"),
    ("3f1e9a4c2b7d4c8e9a1f5d6e7f8a9b0c", r"chatcmpl-[0-9a-f]{32}"),  # hex that uuid.UUID reads, not DeepSeek's form
    (None, r"chatcmpl-[0-9a-f]{32}"),
])
def test_a_replayed_stream_gets_a_new_id_in_the_providers_form(stored: str | None, form: str) -> None:
    """DeepSeek's completion ids are UUIDs, OpenAI's `chatcmpl-...`: a hit's fresh id looks like the miss's."""
    answer = {"id": stored, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}]}
    chunks = parse_events(b"".join(replay(answer, CHAT, include_usage=False)))[:-1]
    ids = {chunk["id"] for chunk in chunks}
    assert len(ids) == 1 and stored not in ids
    assert re.fullmatch(form, ids.pop())


@pytest.mark.parametrize("include_usage", [True, False])
def test_a_deepseek_answer_replays_its_usage_on_the_finish_chunk_asked_for_or_not(include_usage: bool) -> None:
    """DeepSeek streams usage on its last chunk whatever `stream_options` says: a hit of a DeepSeek answer lays its
    chunks out the same way (no chunk without choices, no `"usage": null`), so code that reads `choices[0]` of
    every chunk works on the hit as on the miss."""
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "prompt_cache_hit_tokens": 0,
             "prompt_cache_miss_tokens": 5}
    answer = {"id": "x", "model": "deepseek-chat", "usage": usage, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello there"}, "finish_reason": "stop"}]}
    chunks = parse_events(b"".join(replay(answer, CHAT, include_usage=include_usage)))[:-1]
    assert all(chunk["choices"] for chunk in chunks)
    assert [chunk.get("usage") for chunk in chunks] == [None] * (len(chunks) - 1) + [usage]
    assert all("usage" not in chunk for chunk in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(("data", "route"), [
    (chat_stream(["One ", "two"]), CHAT),
    (tool_stream(), CHAT),
])
def test_replay_round_trips_through_the_tap(data: bytes, route: str) -> None:
    """Tapping a replay of an answer gives back the same message, finish reason and usage."""
    answer = answer_from(data)
    again = answer_from(b"".join(replay(answer, route, include_usage=True)))
    assert again["choices"] == answer["choices"]
    assert again["usage"] == answer["usage"]


def test_replay_of_a_completion() -> None:
    """A cached text_completion replays as text_completion chunks with its text and finish reason."""
    answer = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "text": "Once upon", "finish_reason": "length"}]}
    chunks = parse_events(b"".join(replay(answer, COMPLETIONS, include_usage=False)))
    assert chunks[-1] == "[DONE]"
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "Once upon"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
def test_replay_of_n_choices_replays_every_choice_under_its_index(route: str) -> None:
    """A cached `n: 2` answer replayed to a streaming client carries both choices, each whole."""
    if route == CHAT:
        choices = [{"index": i, "message": {"role": "assistant", "content": f"answer {i}"}, "finish_reason": "stop"}
                   for i in range(2)]
    else:
        choices = [{"index": i, "text": f"answer {i}", "finish_reason": "stop"} for i in range(2)]
    answer = {"id": "x", "model": "m", "choices": choices}
    chunks = parse_events(b"".join(replay(answer, route, include_usage=False)))[:-1]
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        text = "".join((c["delta"].get("content") or "") if route == CHAT else c["text"] for c in mine)
        assert text == f"answer {i}"
        assert mine[-1]["finish_reason"] == "stop"


def test_sse_error_is_an_openai_error_event() -> None:
    """The error event a broken stream ends with carries an OpenAI-style error object."""
    (payload,) = parse_events(sse_error("gone", "upstream_error", "stream_interrupted"))
    assert payload == {"error": {"message": "gone", "type": "upstream_error", "param": None,
                                 "code": "stream_interrupted"}}


def test_every_field_of_a_stream_is_assembled() -> None:
    """reasoning_content, logprobs, refusal, n > 1, system_fingerprint and DeepSeek's usage on the last chunk
    all reach the assembled answer; replaying it and tapping again gives the same answer back."""
    usage = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9, "prompt_cache_hit_tokens": 0,
             "prompt_cache_miss_tokens": 5, "completion_tokens_details": {"reasoning_tokens": 2}}
    top = {"id": "chatcmpl-ds", "object": "chat.completion.chunk", "created": 7, "model": "deepseek-reasoner",
           "system_fingerprint": "fp_ds"}
    lp = [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]

    def chunk(choices: list, **extra: object) -> bytes:
        return event({**top, "choices": choices, **extra})

    data = b"".join([
        chunk([{"index": i, "delta": {"role": "assistant", "content": None, "reasoning_content": ""},
                "logprobs": None, "finish_reason": None} for i in (0, 1)]),
        chunk([{"index": i, "delta": {"content": None, "reasoning_content": "think"}, "logprobs": None,
                "finish_reason": None} for i in (0, 1)]),
        chunk([{"index": i, "delta": {"content": "Hi", "reasoning_content": None}, "logprobs": {"content": lp},
                "finish_reason": None} for i in (0, 1)]),
        chunk([{"index": i, "delta": {"content": ""}, "logprobs": None, "finish_reason": "stop"} for i in (0, 1)],
              usage=usage),
        event("[DONE]"),
    ])
    answer = answer_from(data)
    assert answer["system_fingerprint"] == "fp_ds" and answer["usage"] == usage
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    for choice in answer["choices"]:
        assert choice["message"]["reasoning_content"] == "think" and choice["message"]["content"] == "Hi"
        assert choice["logprobs"] == {"content": lp}
    events = parse_events(b"".join(replay(answer, CHAT, include_usage=False)))
    assert [c for c in events[:-1] if c.get("usage")][-1] is events[-2]  # DeepSeek: usage on the last chunk
    again = answer_from(b"".join(replay(answer, CHAT, include_usage=False)))
    assert {k: v for k, v in again.items() if k not in ("id", "created")} == {
        k: v for k, v in answer.items() if k not in ("id", "created")}


@pytest.mark.parametrize(("answer", "ok"), [
    ({"choices": [{"index": 0, "message": {"role": "assistant", "content": "x", "annotations": []},
                   "finish_reason": "stop"}]}, True),
    ({"choices": [{"index": 0, "message": {"role": "assistant", "content": "x", "audio": {"id": "a"}},
                   "finish_reason": "stop"}]}, False),
    ({"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}],
      "prompt_filter_results": [{"prompt_index": 0}]}, False),
])
def test_replayable_refuses_what_a_hit_would_lose(answer: dict, ok: bool) -> None:
    """An answer carrying a field the replay cannot give back is not cached; empty unknown fields are harmless."""
    from app.proxy.sse import replayable

    assert replayable(answer, CHAT) is ok
