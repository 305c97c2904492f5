"""What makes two requests the same cache entry, and what L2 embeds versus what it must match exactly."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.cache.keys import exact_key, message_text, semantic_parts

CHAT: dict[str, Any] = {
    "model": "mock-gpt",
    "temperature": 0,
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "How do I reset my password?"},
    ],
}


def chat(**changes: Any) -> dict[str, Any]:
    return {**json.loads(json.dumps(CHAT)), **changes}


def with_last(content: Any, role: str = "user") -> dict[str, Any]:
    body = chat()
    body["messages"][-1] = {"role": role, "content": content}
    return body


def test_key_is_sha256_hex() -> None:
    """The exact key is a 64-character hex SHA-256."""
    key = exact_key("chat", "t", CHAT)
    assert len(key) == 64 and int(key, 16) >= 0


def test_field_order_does_not_change_the_key() -> None:
    """The same request with its JSON fields in another order has the same key."""
    reordered = json.loads(json.dumps(dict(reversed(list(CHAT.items())))))
    reordered["messages"] = [dict(reversed(list(m.items()))) for m in reordered["messages"]]
    assert list(reordered) != list(CHAT)
    assert exact_key("chat", "t", reordered) == exact_key("chat", "t", CHAT)


@pytest.mark.parametrize("field, value", [("stream", True), ("stream_options", {"include_usage": True}),
                                          ("user", "alice"), ("metadata", {"a": "b"}), ("store", False)])
def test_delivery_fields_do_not_change_the_key(field: str, value: Any) -> None:
    """Streaming, `user` and other bookkeeping fields share the entry of the plain request."""
    assert exact_key("chat", "t", chat(**{field: value})) == exact_key("chat", "t", CHAT)


@pytest.mark.parametrize("field, value", [("temperature", 0.2), ("max_tokens", 100), ("seed", 7), ("top_p", 0.5),
                                          ("n", 2), ("model", "other"),
                                          ("tools", [{"type": "function", "function": {"name": "f"}}]),
                                          ("service_tier", "flex")])
def test_answer_fields_change_the_key(field: str, value: Any) -> None:
    """Every field that can change the answer changes the key; `service_tier` too, as the answer names the tier
    that served it."""
    assert exact_key("chat", "t", chat(**{field: value})) != exact_key("chat", "t", CHAT)


def test_tenant_and_route_are_part_of_the_key() -> None:
    """Two tenants, or two endpoints, never share an entry."""
    assert exact_key("chat", "a", CHAT) != exact_key("chat", "b", CHAT)
    assert exact_key("chat", "a", CHAT) != exact_key("completions", "a", CHAT)


def test_message_text_changes_the_key() -> None:
    """Different content (even only whitespace inside a message) is a different request."""
    assert exact_key("chat", "t", with_last("How do I reset my password? ")) != exact_key("chat", "t", CHAT)


def test_semantic_text_is_only_the_last_user_turn() -> None:
    """L2 embeds the last user turn, stripped; nothing of the system prompt."""
    parts = semantic_parts("chat", "t", with_last("  How do I reset my password?\n"))
    assert parts is not None
    assert parts.text == "How do I reset my password?"


def test_paraphrase_shares_the_partition() -> None:
    """Two requests differing only in the last user turn's wording land in one partition."""
    a = semantic_parts("chat", "t", CHAT)
    b = semantic_parts("chat", "t", with_last("How can I reset my password?"))
    assert a is not None and b is not None
    assert a.partition == b.partition and a.text != b.text


def test_delivery_fields_do_not_change_the_partition() -> None:
    """A streamed paraphrase looks in the same partition as a plain one."""
    a = semantic_parts("chat", "t", CHAT)
    b = semantic_parts("chat", "t", chat(stream=True, user="bob"))
    assert a is not None and b is not None and a.partition == b.partition


@pytest.mark.parametrize("change", [
    {"temperature": 0.2},
    {"model": "other"},
    {"max_tokens": 50},
    {"messages": [{"role": "system", "content": "You are verbose."}, CHAT["messages"][1]]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, CHAT["messages"][1]]},
    {"messages": [CHAT["messages"][1]]},
])
def test_context_and_parameters_are_in_the_partition(change: dict[str, Any]) -> None:
    """System prompt, earlier turns, model and parameters must match exactly: they pick another partition."""
    a = semantic_parts("chat", "t", CHAT)
    b = semantic_parts("chat", "t", chat(**change))
    assert a is not None and b is not None
    assert a.text == b.text
    assert a.partition != b.partition


def test_tenant_is_in_the_partition() -> None:
    """One tenant's L2 entries are never candidates for another tenant."""
    a, b = semantic_parts("chat", "a", CHAT), semantic_parts("chat", "b", CHAT)
    assert a is not None and b is not None and a.partition != b.partition


@pytest.mark.parametrize("role", ["assistant", "system", "tool"])
def test_last_turn_not_from_the_user_has_no_semantic_parts(role: str) -> None:
    """A request that does not end with a user question never goes to L2."""
    assert semantic_parts("chat", "t", with_last("How do I reset my password?", role=role)) is None


@pytest.mark.parametrize("content", [
    [{"type": "text", "text": "What is in this picture?"},
     {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
    None,
    "   ",
    [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
])
def test_non_text_or_empty_last_turn_has_no_semantic_parts(content: Any) -> None:
    """An image, audio, no content or blank text is never matched by meaning."""
    assert semantic_parts("chat", "t", with_last(content)) is None


def test_text_parts_are_joined() -> None:
    """A last turn made of text parts is embedded as their text."""
    parts = semantic_parts("chat", "t", with_last([{"type": "text", "text": "How do I"},
                                                   {"type": "text", "text": "reset my password?"}]))
    assert parts is not None and parts.text == "How do I\nreset my password?"
    assert message_text([{"type": "text", "text": 3}]) is None


def test_completions_prompt_is_the_semantic_text() -> None:
    """/v1/completions embeds its string prompt; other fields form the partition."""
    body = {"model": "m", "prompt": "Say hello", "temperature": 0}
    parts = semantic_parts("completions", "t", body)
    assert parts is not None and parts.text == "Say hello"
    other = semantic_parts("completions", "t", {**body, "prompt": "Say hi", "temperature": 0.5})
    assert other is not None and other.partition != parts.partition
    assert semantic_parts("completions", "t", {**body, "prompt": ["a", "b"]}) is None


def test_embeddings_have_no_semantic_parts() -> None:
    """Embeddings answers are cached exactly, never by meaning."""
    assert semantic_parts("embeddings", "t", {"model": "e", "input": "hello"}) is None
