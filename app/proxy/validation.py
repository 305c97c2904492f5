"""Parse and check the fields the gateway itself reads; everything else passes through untouched."""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

from app.api import FORWARDED, ParsedRequest
from app.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

# The top-level fields the gateway reads (routing, allow-list, cache key, limits). The provider may read a
# duplicated key another way than Python's last-one-wins, so a body repeating one of them is refused.
READ_FIELDS = ("model", "stream", "messages", "prompt", "input", "temperature", "top_p", "n", "max_tokens",
               "max_completion_tokens", "stream_options")
_QUOTED_READ_FIELDS = tuple(f'"{name}"' for name in READ_FIELDS)  # as each occurs in the body's text
# OpenAI's documented maximum for `n`: more choices than this are never a real request.
MAX_N = 128

# A JSON escape of a UTF-16 surrogate; only such an escape can put a lone surrogate into a parsed string.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decode_body(raw: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """A `Content-Encoding: gzip` (or deflate) body, decoded; the size limit holds for the decoded body too.

    Any other encoding is a 415 naming it, rather than "not valid UTF-8" about compressed bytes.
    """
    encoding = (content_encoding or "").strip().lower()
    if not encoding or encoding == "identity":
        return raw
    wbits = _ENCODINGS.get(encoding)
    if wbits is None:
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:40]!r} is not supported: send the body as is, "
                                   "or gzip/deflate it.")
    decoder = zlib.decompressobj(wbits)
    try:
        data = decoder.decompress(raw, max_bytes + 1)
    except zlib.error:
        raise BadRequest(f"The request body is not valid {encoding} data.", code="invalid_content_encoding") from None
    if len(data) > max_bytes or decoder.unconsumed_tail:
        raise PayloadTooLarge("The decoded request body is larger than the gateway accepts (MAX_BODY_BYTES).")
    if not decoder.eof:
        raise BadRequest(f"The request body is a truncated {encoding} stream.", code="invalid_content_encoding")
    return data


def parse_request(route: str, raw: bytes) -> ParsedRequest:
    """Bytes -> checked request, or a 400 whose message names the field."""
    try:
        # Strict UTF-8 first: json.loads(bytes) would also take UTF-16 and surrogate bytes (CESU-8) and turn
        # them into strings nothing downstream can encode.
        text = raw.decode("utf-8")
        body = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise BadRequest("The request body is not valid UTF-8.", code="invalid_json") from None
    except RecursionError:
        # json's C scanner recurses per nesting level: a body of 100k brackets would otherwise be a 500.
        raise BadRequest("The request body is nested too deeply.", code="invalid_json") from None
    except ValueError:
        raise BadRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    _check_duplicates(text)
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(body):
        raise BadRequest("The request body contains an unpaired UTF-16 surrogate escape (\\ud800-\\udfff).",
                         code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _field("model", "a non-empty string", model)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _field("stream", "a boolean", stream)
    endpoint = FORWARDED[route]
    _BODY_CHECKS[endpoint.body_field](body.get(endpoint.body_field))  # type: ignore[index]
    _check_numbers(body)
    return ParsedRequest(route=route, path=endpoint.path, body=body, raw=raw, model=model,
                         stream=stream and endpoint.streams)


def _check_duplicates(text: str) -> None:
    """Refuse a body naming one of READ_FIELDS twice at its top level.

    A key can only be repeated if its quoted name occurs twice in the text (inside a JSON string the quotes
    would be escaped), so the exact parse with a pairs hook runs only for those rare bodies.
    """
    for quoted in _QUOTED_READ_FIELDS:  # a loop, not any(<genexpr>): this runs on every request
        if text.count(quoted) > 1:
            break
    else:
        return
    objects: list[list[str]] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        objects.append([key for key, _ in items])
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    keys = objects[-1]  # the top-level object is the last one closed
    for name in READ_FIELDS:
        if keys.count(name) > 1:
            raise BadRequest(f"The request body repeats the key '{name}'; send each field once.",
                             code="duplicate_key", param=name)


def _has_lone_surrogate(body: dict[str, Any]) -> bool:
    """A `\\ud800` without its pair parses to a str no UTF-8 encoder, Redis key or tokenizer accepts.

    Paired escapes (an emoji written as two escapes) parse to one code point and pass; the regex keeps this
    full check off the hot path for the bodies (nearly all) that hold no surrogate escape at all.
    """
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _field(name: str, expected: str, value: Any, *, array: bool = False) -> BadRequest:
    """A field the gateway cannot use, refused as OpenAI refuses it: `param` names the field, and `code` says
    whether it was missing (or null), empty (an empty array where one is expected, a blank string), or of the
    wrong type."""
    if value is None:
        return BadRequest(f"Missing required parameter: '{name}'.", code="missing_required_parameter", param=name)
    if array and isinstance(value, list) and not value:
        return BadRequest(f"Invalid '{name}': empty array. Expected {expected}.", code="empty_array", param=name)
    if isinstance(value, str) and not value.strip():
        return BadRequest(f"Invalid '{name}': empty string. Expected {expected}.", code="empty_string", param=name)
    return BadRequest(f"Invalid type for '{name}': expected {expected}.", code="invalid_type", param=name)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _field("messages", "a non-empty array of message objects", messages, array=True)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _field(f"messages[{i}]", "an object", message)
        if not isinstance(message.get("role"), str):
            raise _field(f"messages[{i}].role", "a string", message.get("role"))
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise _field(f"messages[{i}].content", "a string, an array of content parts, or null", content)


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, int, list)) for p in prompt):
        return
    raise _field("prompt", "a string or a non-empty array", prompt, array=True)


def _check_input(value: Any) -> None:
    if isinstance(value, str) or (isinstance(value, list) and value):
        return
    raise _field("input", "a string or a non-empty array", value, array=True)


# The check of each endpoint's input field (`Endpoint.body_field`).
_BODY_CHECKS = {"messages": _check_messages, "prompt": _check_prompt, "input": _check_input}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_numbers(body: dict[str, Any]) -> None:
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None and not _is_number(value):
            raise _field(name, "a number", value)
    for name in ("n", "max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise _field(name, "a positive integer", value)
        if value < 1:
            raise BadRequest(f"Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {value} "
                             "instead.", code="integer_below_min_value", param=name)
    n = body.get("n")
    if n is not None and n > MAX_N:
        raise BadRequest(f"Invalid 'n': at most {MAX_N} choices may be asked for.", code="integer_above_max_value",
                         param="n")
