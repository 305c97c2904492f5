"""Cached answers and streams through the openai SDK: replay, usage, broken streams never stored."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.support import Gateway, MockUpstream, base_env

pytestmark = [pytest.mark.e2e, pytest.mark.gunicorn, pytest.mark.redis]


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, UPSTREAM_MAX_RETRIES="0"))
    yield gw
    gw.stop()


@pytest.fixture
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client-test", max_retries=0, timeout=30) as sdk:
        yield sdk


def ask(unique: str) -> dict[str, Any]:
    return {"model": "mock-gpt", "messages": [{"role": "user", "content": f"Explain the word {unique} to me"}]}


def chat_calls(upstream: MockUpstream) -> int:
    return sum(1 for r in upstream.requests() if r["path"].endswith("/chat/completions"))


def test_cached_answer_replays_as_a_stream(client: openai.OpenAI, upstream: MockUpstream, unique: str) -> None:
    """A cached plain answer streams back as SDK chunks: role, content, finish_reason, a fresh id."""
    stored = client.chat.completions.create(**ask(unique))
    raw = client.chat.completions.with_raw_response.create(**ask(unique), stream=True)
    assert raw.headers["X-Cache"] == "HIT"
    chunks = list(raw.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == stored.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert {c.id for c in chunks} != {stored.id} and len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" and c.model == stored.model for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert chat_calls(upstream) == 1


def test_replay_ends_with_usage_when_asked(client: openai.OpenAI, upstream: MockUpstream, unique: str) -> None:
    """With `stream_options.include_usage` the replay's last chunk carries the stored usage and no choices."""
    stored = client.chat.completions.create(**ask(unique))
    chunks = list(client.chat.completions.create(**ask(unique), stream=True,
                                                 stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and stored.usage is not None
    assert last.usage.total_tokens == stored.usage.total_tokens > 0
    assert last.usage.completion_tokens == stored.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == stored.choices[0].message.content
    assert chat_calls(upstream) == 1


def test_stream_cut_midway_is_an_error_and_not_stored(client: openai.OpenAI, upstream: MockUpstream,
                                                      unique: str) -> None:
    """An upstream stream reset after two chunks surfaces as an SDK error; the same request then misses."""
    upstream.faults({"kind": "reset", "after_chunks": 2})
    received = []
    with pytest.raises(openai.APIError) as failure:
        for chunk in client.chat.completions.create(**ask(unique), stream=True):
            received.append(chunk)
    # The gateway's error event, not a dropped connection: the client learns why the answer stopped.
    assert not isinstance(failure.value, openai.APIConnectionError)
    assert "upstream" in failure.value.message
    assert len(received) <= 2
    again = client.chat.completions.with_raw_response.create(**ask(unique))
    assert again.headers["X-Cache"] == "MISS"
    assert again.parse().choices[0].message.content == f"Mock answer to: Explain the word {unique} to me"
    assert chat_calls(upstream) == 2


def test_clean_streamed_miss_is_stored(client: openai.OpenAI, upstream: MockUpstream, unique: str) -> None:
    """A complete streamed answer is cached: the next plain request is a hit with the same content."""
    raw = client.chat.completions.with_raw_response.create(**ask(unique), stream=True)
    assert raw.headers["X-Cache"] == "MISS"
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    hit = client.chat.completions.with_raw_response.create(**ask(unique))
    assert hit.headers["X-Cache"] == "HIT"
    answer = hit.parse()
    assert answer.choices[0].message.content == text == f"Mock answer to: Explain the word {unique} to me"
    assert answer.choices[0].finish_reason == "stop"
    assert chat_calls(upstream) == 1
