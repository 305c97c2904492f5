"""The official openai SDK against the gateway (real gunicorn, gevent) in front of the mock upstream."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import openai
import pytest
import requests

from tests.support import Gateway, MockUpstream, base_env

pytestmark = [pytest.mark.e2e, pytest.mark.gunicorn, pytest.mark.redis]

MODEL = "mock-gpt"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, UPSTREAM_API_KEYS=f"sk-e2e-{uuid.uuid4().hex}"))
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client-e2e", max_retries=0, timeout=30)
    yield sdk
    sdk.close()


@pytest.fixture
def question(unique: str) -> str:
    """A fresh question per test, so no answer comes from an earlier run's cache."""
    return f"what is {unique} made of"


def test_chat_plain(client: openai.OpenAI, question: str) -> None:
    """A chat completion comes back as the upstream wrote it, with usage."""
    completion = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}])
    assert completion.choices[0].message.content == f"Mock answer to: {question}"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == MODEL
    assert completion.usage is not None and completion.usage.total_tokens > 0


def test_chat_stream_without_usage(client: openai.OpenAI, question: str) -> None:
    """Stream deltas join to the full answer; a client that did not ask for usage gets no usage chunk."""
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == f"Mock answer to: {question}"
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_with_usage(client: openai.OpenAI, question: str) -> None:
    """A client that asked for include_usage gets the final usage-only chunk."""
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == f"Mock answer to: {question}"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens > 0
    assert [c for c in chunks if c.usage is not None] == [last]


def test_completions_plain_and_streamed(client: openai.OpenAI, question: str) -> None:
    """Legacy completions work plain and streamed, with the same text."""
    plain = client.completions.create(model=MODEL, prompt=question)
    text = plain.choices[0].text
    assert question in text
    streamed = list(client.completions.create(model=MODEL, prompt=question + " again", stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text.replace(question, question + " again")
    assert all(c.usage is None for c in streamed)


def test_embeddings_default_base64(client: openai.OpenAI, upstream: MockUpstream, question: str) -> None:
    """The SDK's default (base64) embeddings decode to the vector the upstream gives for the same text."""
    result = client.embeddings.create(model="text-embedding-3-small", input=[question, "second text"])
    assert [d.index for d in result.data] == [0, 1]
    direct = requests.post(upstream.url + "/v1/embeddings", headers={"Authorization": "Bearer direct"},
                           json={"model": "text-embedding-3-small", "input": [question, "second text"],
                                 "encoding_format": "float"}, timeout=10).json()
    assert [d.embedding for d in result.data] == [d["embedding"] for d in direct["data"]]
    sent = [r["body"] for r in upstream.requests() if r["path"].endswith("/embeddings")][0]
    assert sent["encoding_format"] == "base64"  # the SDK's default reached the upstream untouched


def test_models_list(client: openai.OpenAI) -> None:
    """The model list is the upstream's."""
    ids = [model.id for model in client.models.list()]
    assert MODEL in ids and "text-embedding-3-small" in ids


def test_tool_call_passes_through(client: openai.OpenAI, unique: str) -> None:
    """A tool-call answer reaches the SDK as a parsed tool call, plain and streamed."""
    messages = [{"role": "user", "content": f"please call a tool for {unique}"}]
    completion = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    (call,) = completion.choices[0].message.tool_calls
    assert completion.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "mock"}

    stream = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], stream=True)
    name, arguments, finish = "", "", None
    for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            name += delta_call.function.name or ""
            arguments += delta_call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, json.loads(arguments), finish) == ("get_weather", {"city": "mock"}, "tool_calls")


def test_upstream_error_reaches_the_sdk_as_its_exception(client: openai.OpenAI, upstream: MockUpstream,
                                                          question: str) -> None:
    """An upstream 400 surfaces as openai.BadRequestError with the upstream's message."""
    upstream.faults({"status": 400, "message": "This model's maximum context length is exceeded."})
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}])
    assert "maximum context length" in str(info.value)
