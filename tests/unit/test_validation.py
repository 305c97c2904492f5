"""parse_request: the fields the gateway reads are checked, everything else passes through untouched."""

from __future__ import annotations

import json

import pytest

from app.api import CHAT, COMPLETIONS, EMBEDDINGS
from app.errors import BadRequest
from app.proxy.validation import parse_request

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: object) -> bytes:
    return json.dumps({"model": "mock-gpt", "messages": MESSAGES, **fields}).encode()


def bad_request(route: str, raw: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse_request(route, raw)
    assert info.value.status == 400
    return info.value


def test_valid_chat_request_is_parsed_and_kept_byte_for_byte() -> None:
    """A valid body is accepted, its raw bytes kept exactly, unknown fields included."""
    raw = b'{"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}], "x_vendor": {"a": [1, 2.50]}}'
    parsed = parse_request(CHAT, raw)
    assert parsed.raw == raw
    assert parsed.model == "mock-gpt"
    assert parsed.stream is False
    assert parsed.path == "/v1/chat/completions"
    assert parsed.body["x_vendor"] == {"a": [1, 2.5]}


@pytest.mark.parametrize("fields", [
    {"stream": True, "stream_options": {"include_usage": True}},
    {"stream": None},
    {"temperature": 0, "top_p": 0.5, "n": 2, "max_tokens": 16, "max_completion_tokens": 1},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant",
                                                                                  "content": None}]},
    {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"},
])
def test_valid_variants_are_accepted(fields: dict[str, object]) -> None:
    """Streaming, numeric options, content parts, null content and tools are all valid."""
    parsed = parse_request(CHAT, chat(**fields))
    assert parsed.stream is (fields.get("stream") is True)


@pytest.mark.parametrize(("raw", "field"), [
    (b"not json", "JSON"),
    (b"", "JSON"),
    (b"[1, 2]", "object"),
    (b'"a string"', "object"),
    (b"null", "object"),
    (b'{"model": "m", "messages": [], "temperature": NaN}', "JSON"),
    (b'{"model": "m", "messages": [], "temperature": Infinity}', "JSON"),
    (b'{"model": "\xff\xfe"}', "UTF-8"),
    (json.dumps({"messages": MESSAGES}).encode(), "model"),
    (json.dumps({"model": 5, "messages": MESSAGES}).encode(), "model"),
    (json.dumps({"model": "  ", "messages": MESSAGES}).encode(), "model"),
    (chat(messages="hi"), "messages"),
    (chat(messages=[]), "messages"),
    (chat(messages=["hi"]), "messages[0]"),
    (chat(messages=[{"content": "hi"}]), "messages[0].role"),
    (chat(messages=[{"role": 1, "content": "hi"}]), "messages[0].role"),
    (chat(messages=[{"role": "user", "content": {"text": "hi"}}]), "messages[0].content"),
    (chat(stream="yes"), "stream"),
    (chat(stream=1), "stream"),
    (chat(temperature="hot"), "temperature"),
    (chat(temperature=True), "temperature"),
    (chat(top_p=[1]), "top_p"),
    (chat(n=0), "'n'"),
    (chat(n=True), "'n'"),
    (chat(n=1.5), "'n'"),
    (chat(max_tokens=-1), "max_tokens"),
])
def test_broken_chat_bodies_are_a_400_naming_the_problem(raw: bytes, field: str) -> None:
    """Each broken body is refused with a BadRequest whose message names what is wrong."""
    assert field in bad_request(CHAT, raw).message


@pytest.mark.parametrize(("raw", "param", "code"), [
    (json.dumps({"messages": MESSAGES}).encode(), "model", "missing_required_parameter"),
    (json.dumps({"model": 5, "messages": MESSAGES}).encode(), "model", "invalid_type"),
    (json.dumps({"model": "mock-gpt"}).encode(), "messages", "missing_required_parameter"),
    (chat(messages=[]), "messages", "empty_array"),
    (json.dumps({"model": [], "messages": MESSAGES}).encode(), "model", "invalid_type"),
    (json.dumps({"model": " ", "messages": MESSAGES}).encode(), "model", "empty_string"),
    (json.dumps({"model": "m", "messages": None}).encode(), "messages", "missing_required_parameter"),
    (chat(messages=[{"content": "hi"}]), "messages[0].role", "missing_required_parameter"),
    (chat(messages=[{"role": 1, "content": "hi"}]), "messages[0].role", "invalid_type"),
    (chat(temperature="hot"), "temperature", "invalid_type"),
    (chat(n=0), "n", "integer_below_min_value"),
    (chat(n=1000), "n", "integer_above_max_value"),
    (chat(max_tokens=-1), "max_tokens", "integer_below_min_value"),
    (b'{"model": "m", "model": "n", "messages": []}', "model", "duplicate_key"),
])
def test_a_refused_field_is_named_in_param_with_openais_code(raw: bytes, param: str, code: str) -> None:
    """As OpenAI answers: the error's `param` is the field at fault (the SDK's `e.param`), its `code` what is
    wrong with it."""
    body = bad_request(CHAT, raw).body()["error"]
    assert (body["param"], body["code"], body["type"]) == (param, code, "invalid_request_error")


def test_lone_surrogate_escape_is_a_400_and_paired_escapes_pass() -> None:
    """`\\ud800` alone parses to a str nothing can encode (cache key, Redis, tokenizer): refused up front."""
    lone = b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    assert "surrogate" in bad_request(CHAT, lone).message
    paired = b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    assert parse_request(CHAT, paired).body["messages"][0]["content"] == "\U0001F600"
    escaped_backslash = b'{"model": "m", "messages": [{"role": "user", "content": "\\\\ud800"}]}'
    assert parse_request(CHAT, escaped_backslash).body["messages"][0]["content"] == "\\ud800"


@pytest.mark.parametrize("raw", [
    pytest.param('{"model": "m", "messages": [{"role": "user", "content": "a\ud800b"}]}'
                 .encode("utf-8", "surrogatepass"), id="surrogate-bytes"),
    pytest.param('{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'.encode("utf-16"), id="utf-16"),
])
def test_bodies_that_are_not_strict_utf8_are_refused(raw: bytes) -> None:
    """Surrogate bytes (CESU-8) or a UTF-16 body: json.loads(bytes) would take them, the gateway says 400."""
    assert "UTF-8" in bad_request(CHAT, raw).message


def test_deeply_nested_json_is_a_400_not_a_crash() -> None:
    """JSON nested deeper than the parser's recursion limit is a bad request, not an internal error."""
    raw = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    bad_request(CHAT, raw)
    bad_request(EMBEDDINGS, b"[" * 100_000)


@pytest.mark.parametrize("prompt", ["once", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completions_prompt_forms_are_accepted(prompt: object) -> None:
    """A string, a list of strings, a token list or token lists are valid prompts."""
    assert parse_request(COMPLETIONS, json.dumps({"model": "m", "prompt": prompt}).encode()).model == "m"


@pytest.mark.parametrize("prompt", [None, 5, [], {"text": "x"}])
def test_bad_completions_prompt_is_refused(prompt: object) -> None:
    """A missing, numeric, empty or object prompt is a 400 naming `prompt`."""
    assert "prompt" in bad_request(COMPLETIONS, json.dumps({"model": "m", "prompt": prompt}).encode()).message


def test_embeddings_input_is_checked_and_never_streamed() -> None:
    """Embeddings need a string or non-empty list input; `stream` never makes them a stream."""
    assert parse_request(EMBEDDINGS, b'{"model": "e", "input": "x", "stream": true}').stream is False
    assert parse_request(EMBEDDINGS, b'{"model": "e", "input": ["x", "y"]}').model == "e"
    for value in (None, [], 3):
        assert "input" in bad_request(EMBEDDINGS, json.dumps({"model": "e", "input": value}).encode()).message


def test_decode_body_gzip_deflate_and_limits() -> None:
    """gzip/deflate bodies decode; the limit applies to the decoded size; truncated or unknown encodings refuse."""
    import gzip
    import zlib

    from app.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
    from app.proxy.validation import decode_body

    data = b'{"model": "m"}'
    assert decode_body(gzip.compress(data), "GZIP", 100) == data
    assert decode_body(zlib.compress(data), "deflate", 100) == data
    assert decode_body(data, None, 100) == data and decode_body(data, "identity", 100) == data
    with pytest.raises(PayloadTooLarge):
        decode_body(gzip.compress(b" " * 10_000_000), "gzip", 1000)  # a bomb is cut after the limit
    with pytest.raises(BadRequest):
        decode_body(gzip.compress(data)[:-12], "gzip", 100)
    with pytest.raises(UnsupportedMediaType, match="'br'"):
        decode_body(data, "br", 100)


@pytest.mark.parametrize(("path", "canonical"), [
    ("/chat/completions", "/v1/chat/completions"), ("/v1/chat/completions/", "/v1/chat/completions"),
    ("/models/deepseek-chat", "/v1/models/deepseek-chat"), ("/embeddings/", "/v1/embeddings"),
    ("/healthz", "/healthz"), ("/admin/cache/", "/admin/cache"), ("/", "/"),
])
def test_canonical_paths(path: str, canonical: str) -> None:
    """DeepSeek-style paths without /v1 and trailing slashes map to the routes' own paths."""
    from app.proxy.context import canonical_path

    assert canonical_path(path) == canonical
