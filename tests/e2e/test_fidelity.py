"""Cache fidelity through the openai SDK: a hit carries every field of the miss, in the form the client asked for.

For each answer shape (DeepSeek's reasoner with its usage, logprobs, a tool call, `n: 2`) and each of the four
orders (plain or streamed miss, then plain or streamed hit), the hit is compared with the miss field by field.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.support import Gateway, MockUpstream, base_env

pytestmark = [pytest.mark.e2e, pytest.mark.gunicorn, pytest.mark.redis]

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

SHAPES = {
    "deepseek-reasoner": {"model": "deepseek-reasoner"},
    "deepseek-chat-logprobs": {"model": "deepseek-chat", "logprobs": True, "top_logprobs": 2},
    "openai-logprobs": {"model": "gpt-4o-mini", "logprobs": True, "top_logprobs": 3},
    "tool-call": {"model": "gpt-4o-mini", "tools": [TOOL], "question": "please call a tool"},
    "n-2": {"model": "gpt-4o-mini", "n": 2, "temperature": 0.0},
}
ORDERS = [(False, False), (False, True), (True, False), (True, True)]


@pytest.fixture(scope="module")
def client(upstream_server: MockUpstream) -> Iterator[openai.OpenAI]:
    """The SDK in front of a gateway with the exact cache on (and L2 off: hits here are exact)."""
    gw = Gateway(base_env(upstream_server, UPSTREAM_API_KEYS=f"sk-fidelity-{uuid.uuid4().hex}"))
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-client", max_retries=0, timeout=30)
    try:
        yield sdk
    finally:
        sdk.close()
        gw.stop()


def extra(obj: Any, name: str) -> Any:
    """A provider field the SDK keeps as an extra (DeepSeek's reasoning_content)."""
    return getattr(obj, name, None) if name in type(obj).model_fields else (obj.model_extra or {}).get(name)


def new_choice() -> dict[str, Any]:
    return {"role": None, "content": None, "reasoning_content": None, "refusal": None, "tool_calls": {},
            "logprobs": None, "finish_reason": None}


def append(slot: dict[str, Any], name: str, value: str | None) -> None:
    if value is not None:
        slot[name] = (slot[name] or "") + value


def from_plain(completion: Any) -> dict[str, Any]:
    choices = {}
    for choice in completion.choices:
        message = choice.message
        slot = new_choice()
        slot.update(role=message.role, content=message.content, refusal=message.refusal,
                    reasoning_content=extra(message, "reasoning_content"), finish_reason=choice.finish_reason)
        for i, call in enumerate(message.tool_calls or []):
            slot["tool_calls"][i] = {"id": call.id, "type": call.type, "name": call.function.name,
                                     "arguments": call.function.arguments}
        if choice.logprobs is not None and choice.logprobs.content is not None:
            slot["logprobs"] = [t.model_dump() for t in choice.logprobs.content]
        choices[choice.index] = slot
    usage = completion.usage.model_dump() if completion.usage else None
    return {"model": completion.model, "system_fingerprint": completion.system_fingerprint, "usage": usage,
            "choices": choices}


def from_stream(stream: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": None, "system_fingerprint": None, "usage": None, "choices": {}}
    for chunk in stream:
        out["model"] = chunk.model
        out["system_fingerprint"] = chunk.system_fingerprint or out["system_fingerprint"]
        if chunk.usage is not None:
            out["usage"] = chunk.usage.model_dump()
        for choice in chunk.choices:
            slot = out["choices"].setdefault(choice.index, new_choice())
            delta = choice.delta
            slot["role"] = delta.role or slot["role"]
            append(slot, "content", delta.content)
            append(slot, "refusal", delta.refusal)
            append(slot, "reasoning_content", extra(delta, "reasoning_content"))
            for call in delta.tool_calls or []:
                entry = slot["tool_calls"].setdefault(call.index, {"id": None, "type": None, "name": "",
                                                                   "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["type"] = call.type or entry["type"]
                if call.function is not None:
                    entry["name"] += call.function.name or ""
                    entry["arguments"] += call.function.arguments or ""
            if choice.logprobs is not None and choice.logprobs.content is not None:
                slot["logprobs"] = (slot["logprobs"] or []) + [t.model_dump() for t in choice.logprobs.content]
            slot["finish_reason"] = choice.finish_reason or slot["finish_reason"]
    return out


def ask(client: openai.OpenAI, shape: dict[str, Any], question: str, stream: bool) -> tuple[dict[str, Any], str]:
    params = {k: v for k, v in shape.items() if k != "question"}
    if stream and not params["model"].startswith("deepseek"):
        params["stream_options"] = {"include_usage": True}  # OpenAI streams carry usage only when asked
    raw = client.chat.completions.with_raw_response.create(
        messages=[{"role": "user", "content": question}], stream=stream, **params)
    parsed = raw.parse()
    return (from_stream(parsed) if stream else from_plain(parsed)), raw.headers["x-cache"]


def settle(streamed: bool) -> None:
    """A streamed answer is stored once its last bytes left: the contract is visible within 100 ms, not at once."""
    if streamed:
        time.sleep(0.15)


@pytest.mark.parametrize(("miss_stream", "hit_stream"), ORDERS, ids=["plain-plain", "plain-stream", "stream-plain",
                                                                     "stream-stream"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_a_hit_carries_every_field_of_the_miss(client: openai.OpenAI, shape_name: str, miss_stream: bool,
                                               hit_stream: bool) -> None:
    """Miss in one form, hit in the other (or the same): every field the SDK shows is the same."""
    shape = SHAPES[shape_name]
    question = f"{shape.get('question', 'tell me about')} {uuid.uuid4().hex}"
    miss, miss_cache = ask(client, shape, question, miss_stream)
    settle(miss_stream)
    hit, hit_cache = ask(client, shape, question, hit_stream)
    assert (miss_cache, hit_cache) == ("MISS", "HIT")
    assert hit == miss
    first = miss["choices"][0]
    assert first["finish_reason"] in ("stop", "tool_calls")
    if shape_name == "deepseek-reasoner":
        assert first["reasoning_content"] and miss["usage"]["prompt_cache_miss_tokens"] > 0
        assert "prompt_cache_hit_tokens" in miss["usage"]
    if "logprobs" in shape:
        assert first["logprobs"] and len(first["logprobs"][0]["top_logprobs"]) == shape["top_logprobs"]
    if shape_name == "tool-call":
        assert first["tool_calls"][0]["name"] == "get_weather" and first["tool_calls"][0]["id"]
    if shape_name == "n-2":
        assert sorted(hit["choices"]) == [0, 1]
    assert miss["system_fingerprint"] and miss["usage"]


@pytest.mark.parametrize("framing", [{"crlf": True}, {"split": 7}, {"gzip": True},
                                     {"crlf": True, "split": 3, "gzip": True}],
                         ids=["crlf", "split-7", "gzip", "all"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_upstream_framing_does_not_change_the_answer(client: openai.OpenAI, upstream: MockUpstream,
                                                     framing: dict, stream: bool) -> None:
    """CRLF line ends, events cut across writes and a gzip body give the same answer, cached whole."""
    shape = SHAPES["deepseek-reasoner"]
    question = f"framed {uuid.uuid4().hex}"
    upstream.faults({"kind": "wire", **framing})
    miss, miss_cache = ask(client, shape, question, stream)
    settle(stream)
    hit, hit_cache = ask(client, shape, question, not stream)
    assert (miss_cache, hit_cache) == ("MISS", "HIT")
    assert miss["choices"][0]["content"] == f"Mock answer to: {question}"
    assert miss["choices"][0]["reasoning_content"] and miss["usage"]["total_tokens"] > 0
    assert hit == miss


def test_async_sdk_sees_the_same_hit(client: openai.OpenAI, upstream: MockUpstream) -> None:
    """The async SDK: a streamed DeepSeek reasoner miss, then a plain and a streamed hit, all field for field."""
    shape = SHAPES["deepseek-reasoner"]
    question = f"async {uuid.uuid4().hex}"

    async def run() -> list[dict[str, Any]]:
        sdk = openai.AsyncOpenAI(base_url=str(client.base_url), api_key="sk-client", max_retries=0, timeout=30)
        out = []
        try:
            for stream in (True, False, True):
                messages = [{"role": "user", "content": question}]
                if stream:
                    chunks = [c async for c in await sdk.chat.completions.create(
                        model=shape["model"], messages=messages, stream=True)]
                    out.append(from_stream(chunks))
                    await asyncio.sleep(0.15)
                else:
                    out.append(from_plain(await sdk.chat.completions.create(model=shape["model"],
                                                                            messages=messages)))
        finally:
            await sdk.close()
        return out

    miss, plain_hit, stream_hit = asyncio.run(run())
    assert miss["choices"][0]["reasoning_content"] and miss["usage"]["prompt_cache_miss_tokens"] > 0
    assert plain_hit == miss and stream_hit == miss
    assert len(upstream.requests()) == 1  # the two others were hits
