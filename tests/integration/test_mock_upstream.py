"""The mock upstream (tools/mock_upstream.py), run as a real process on a loopback port, driven by requests and the
official openai SDK: it must look like the real API to both, and its fault queue must do what tests script."""

import base64
import http.client
import json
import math
import select
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import openai
import pytest
import requests

MOCK = Path(__file__).resolve().parents[2] / "tools" / "mock_upstream.py"
KEY = "sk-test-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "what is the capital of France"}]}
ANSWER = "Mock answer to: what is the capital of France"


def start_mock(*args: str) -> tuple[subprocess.Popen[str], str]:
    """Start the mock on a free port and wait for its 'listening' line."""
    proc = subprocess.Popen(
        [sys.executable, str(MOCK), "--port", "0", *args], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline() if ready else ""
    if "listening on " not in line:
        stop_mock(proc)
        pytest.fail(f"mock upstream did not start: {line!r}")
    return proc, line.strip().rsplit(" ", 1)[1]


def stop_mock(proc: subprocess.Popen[str]) -> int:
    """SIGTERM the mock and reap it; kill it only if it does not exit."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait(5)
    finally:
        if proc.stdout:
            proc.stdout.close()


@pytest.fixture(scope="module")
def mock_server() -> Iterator[str]:
    proc, url = start_mock()
    try:
        yield url
    finally:
        stop_mock(proc)


@pytest.fixture
def url(mock_server: str) -> str:
    """The shared mock, reset so each test starts with no faults and an empty log."""
    requests.post(f"{mock_server}/_mock/reset", timeout=5).raise_for_status()
    return mock_server


@pytest.fixture
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=10) as sdk:
        yield sdk


def queue(url: str, *faults: dict) -> None:
    requests.post(f"{url}/_mock/faults", json={"faults": list(faults)}, timeout=5).raise_for_status()


def chat(url: str, body: dict | None = None, path: str = "/v1/chat/completions", **kw) -> requests.Response:
    return requests.post(f"{url}{path}", json=body or CHAT, headers=kw.pop("headers", AUTH), timeout=10, **kw)


def test_chat_completion_shape(url: str) -> None:
    """A plain chat answer has OpenAI's fields and answers the last user turn."""
    resp = chat(url)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    body = resp.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "mock-gpt" and isinstance(body["created"], int) and body["system_fingerprint"]
    deepseek = chat(url, {**CHAT, "model": "deepseek-chat"}).json()["id"]
    assert str(uuid.UUID(deepseek)) == deepseek, "DeepSeek's completion ids are UUIDs"
    (choice,) = body["choices"]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": ANSWER, "refusal": None},
        "logprobs": None,
        "finish_reason": "stop",
    }
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_paths_without_v1_prefix_work(url: str) -> None:
    """/chat/completions answers like /v1/chat/completions (base URLs with and without /v1)."""
    assert chat(url, path="/chat/completions").json()["choices"][0]["message"]["content"] == ANSWER


def test_sdk_chat_parts_n_and_max_tokens(client: openai.OpenAI) -> None:
    """The SDK parses answers; list-of-parts content, n choices and max_tokens truncation ("length") work."""
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]
    resp = client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": parts}], n=2)
    assert [c.message.content for c in resp.choices] == ["Mock answer to: hello world"] * 2
    cut = client.chat.completions.create(model="m", messages=CHAT["messages"], max_tokens=2)
    assert cut.choices[0].message.content == "Mock answer"
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 2


def test_sdk_chat_stream_with_usage(client: openai.OpenAI) -> None:
    """A stream arrives in several content chunks, then finish_reason, then the usage chunk when asked for."""
    stream = client.chat.completions.create(
        model="mock-gpt", messages=CHAT["messages"], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(content) == ANSWER and len(content) >= 5
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(content)


def test_stream_raw_events(url: str) -> None:
    """On the wire: text/event-stream, `data: {json}` events, [DONE] last, no usage chunk unless asked."""
    with chat(url, {**CHAT, "stream": True}, stream=True) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == b"data: [DONE]"
    assert all(e.startswith(b"data: {") for e in events[:-1])
    assert b'"finish_reason":"stop"' in events[-2] and b'"usage"' not in b"".join(events)


def stream_chunks(url: str, body: dict) -> list[dict]:
    return [json.loads(line[6:]) for line in chat(url, {**body, "stream": True}).text.split("\n\n")
            if line.startswith("data: {")]


def test_openai_streams_pad_their_delta_chunks_unless_asked_not_to(url: str) -> None:
    """OpenAI's `obfuscation` (stream_options.include_obfuscation, on by default): random characters of random
    length on every delta chunk, none on the usage chunk; off when the client says false; DeepSeek sends none."""
    options = {"stream_options": {"include_usage": True}}
    chunks = stream_chunks(url, {**CHAT, **options})
    deltas, (usage,) = chunks[:-1], chunks[-1:]
    pads = [chunk.get("obfuscation") for chunk in deltas]
    assert all(isinstance(pad, str) and pad for pad in pads) and len(set(pads)) > 1
    assert "obfuscation" not in usage and usage["usage"]["total_tokens"] > 0
    off = stream_chunks(url, {**CHAT, "stream_options": {"include_usage": True, "include_obfuscation": False}})
    assert not any("obfuscation" in chunk for chunk in off)
    deepseek = stream_chunks(url, {**CHAT, "model": "deepseek-chat"})
    assert not any("obfuscation" in chunk for chunk in deepseek)


def test_sdk_tool_call(client: openai.OpenAI) -> None:
    """With tools and "call a tool" in the question, the answer is a function call with JSON arguments."""
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    messages = [{"role": "user", "content": "Please call a tool for Paris"}]
    resp = client.chat.completions.create(model="m", messages=messages, tools=[tool])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and call.function.arguments == '{"city": "mock"}'
    chunks = list(client.chat.completions.create(model="m", messages=messages, tools=[tool], stream=True))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    assert deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments for d in deltas) == '{"city": "mock"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_sdk_completions_plain_and_stream(client: openai.OpenAI) -> None:
    """Legacy completions, whole and streamed."""
    resp = client.completions.create(model="m", prompt=["one two", "ignored"])
    assert resp.object == "text_completion" and resp.choices[0].text == "Mock completion of: one two"
    stream = client.completions.create(model="m", prompt="one two", stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == "Mock completion of: one two"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sdk_embeddings_base64_default_matches_float(url: str, client: openai.OpenAI) -> None:
    """The SDK's default base64 request decodes to the same unit vectors the float format returns."""
    resp = client.embeddings.create(model="text-embedding-3-small", input=["the cat", "a dog", "the cat"])
    sent = requests.get(f"{url}/_mock/requests", timeout=5).json()["requests"][-1]["body"]
    assert sent["encoding_format"] == "base64"
    vectors = [d.embedding for d in resp.data]
    assert [len(v) for v in vectors] == [384] * 3 and vectors[0] == vectors[2] != vectors[1]
    assert math.isclose(sum(x * x for x in vectors[0]), 1.0, rel_tol=1e-5)
    floats = client.embeddings.create(model="e", input="the cat", encoding_format="float").data[0].embedding
    assert floats == vectors[0]
    raw = requests.post(
        f"{url}/v1/embeddings",
        json={"model": "e", "input": "the cat", "dimensions": 8, "encoding_format": "base64"},
        headers=AUTH,
        timeout=5,
    ).json()
    assert len(struct.unpack("<8f", base64.b64decode(raw["data"][0]["embedding"]))) == 8
    assert raw["usage"]["prompt_tokens"] == raw["usage"]["total_tokens"] > 0


def test_sdk_models(client: openai.OpenAI) -> None:
    """GET /v1/models lists the default models, owned by "mock"."""
    models = list(client.models.list())
    assert {"mock-gpt", "deepseek-chat", "gpt-4o-mini"} <= {m.id for m in models}
    assert all(m.owned_by == "mock" and m.object == "model" for m in models)


def test_queued_429_then_success(url: str) -> None:
    """A queued 429 is answered once, with Retry-After and OpenAI's error body; the next request succeeds."""
    queue(url, {"status": 429, "retry_after": 1})
    first = chat(url)
    assert first.status_code == 429 and first.headers["Retry-After"] == "1"
    assert first.json()["error"]["code"] == "rate_limit_exceeded"
    assert chat(url).status_code == 200


def test_sdk_sees_status_faults_as_api_errors(client: openai.OpenAI, url: str) -> None:
    """The SDK raises its typed errors for queued 503 and 429."""
    queue(url, {"status": 503}, {"status": 429})
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=CHAT["messages"])
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="m", messages=CHAT["messages"])


def test_fault_key_times_and_paths(url: str) -> None:
    """Faults match by key, last `times` uses, and skip /v1/models unless their paths name it."""
    queue(url, {"status": 500, "key": "other", "times": 2}, {"status": 502, "paths": ["/v1/models"]})
    assert chat(url).status_code == 200
    other = {"Authorization": "Bearer other"}
    assert [chat(url, headers=other).status_code for _ in range(3)] == [500, 500, 200]
    assert requests.get(f"{url}/models", headers=AUTH, timeout=5).status_code == 502
    assert requests.get(f"{url}/_mock/faults", timeout=5).json() == {"faults": []}


def test_reset_fault_breaks_stream(url: str, client: openai.OpenAI) -> None:
    """A reset after 2 chunks gives those chunks, then a broken body: the reader raises instead of ending."""
    queue(url, {"kind": "reset", "after_chunks": 2, "times": 2})
    received = []
    with pytest.raises(requests.exceptions.RequestException):
        with chat(url, {**CHAT, "stream": True}, stream=True) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line:
                    received.append(line)
    assert len(received) == 2
    with pytest.raises((openai.APIError, httpx2.HTTPError)):
        list(client.chat.completions.create(model="m", messages=CHAT["messages"], stream=True))


def test_reset_fault_without_stream_drops_connection(url: str) -> None:
    """A non-streamed reset closes the connection without any answer."""
    queue(url, {"kind": "reset"})
    with pytest.raises(requests.exceptions.ConnectionError):
        chat(url)
    assert chat(url).status_code == 200


def test_garbage_and_length_faults(url: str) -> None:
    """garbage: 200 with a body that is not JSON; length: a cut answer with finish_reason "length"."""
    queue(url, {"kind": "garbage"}, {"kind": "length"})
    garbage = chat(url)
    assert garbage.status_code == 200 and garbage.text == "not json"
    cut = chat(url).json()["choices"][0]
    assert cut["finish_reason"] == "length" and ANSWER.startswith(cut["message"]["content"])
    assert len(cut["message"]["content"]) < len(ANSWER)


def test_delay_fault_and_runtime_latency(url: str) -> None:
    """A delay fault and /_mock/config latency both hold the answer back; /_mock/reset restores the CLI value."""
    queue(url, {"kind": "delay", "seconds": 0.3})
    started = time.monotonic()
    chat(url)
    assert time.monotonic() - started >= 0.3
    config = requests.post(f"{url}/_mock/config", json={"latency": 0.2}, timeout=5).json()["config"]
    assert config == {"latency": 0.2, "chunk_delay": 0.0}
    started = time.monotonic()
    chat(url)
    assert time.monotonic() - started >= 0.2
    assert requests.post(f"{url}/_mock/reset", timeout=5).json()["config"]["latency"] == 0.0


def test_slow_chunks_fault(url: str) -> None:
    """slow_chunks spaces the stream's events by the given delay."""
    queue(url, {"kind": "slow_chunks", "delay": 0.05})
    started = time.monotonic()
    with chat(url, {**CHAT, "stream": True}, stream=True) as resp:
        events = [line for line in resp.iter_lines() if line]
    assert time.monotonic() - started >= 0.05 * (len(events) - 1)


def test_concurrent_slow_requests(url: str) -> None:
    """200 concurrent requests that each take 1 s finish in about 1 s: the mock does not serialise them."""
    queue(url, {"kind": "delay", "seconds": 1, "times": 200})
    started = time.monotonic()
    with ThreadPoolExecutor(200) as pool:
        statuses = list(pool.map(lambda _: chat(url).status_code, range(200)))
    assert statuses == [200] * 200
    assert time.monotonic() - started < 4


def test_request_log_and_errors(url: str) -> None:
    """The log records key, body, headers and stream; bad JSON is a 400 and an unknown path a 404, OpenAI-style."""
    chat(url, {**CHAT, "stream": True})
    bad = requests.post(f"{url}/v1/chat/completions", data=b"{nope", headers=AUTH, timeout=5)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    missing = requests.post(f"{url}/v1/nothing", json={}, headers=AUTH, timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]["message"].startswith("Invalid URL")
    logged = requests.get(f"{url}/_mock/requests", timeout=5).json()["requests"]
    assert [r["path"] for r in logged] == ["/v1/chat/completions", "/v1/chat/completions", "/v1/nothing"]
    first = logged[0]
    assert first["key"] == KEY and first["body"] == {**CHAT, "stream": True} and first["stream"] is True
    assert first["method"] == "POST" and first["headers"]["authorization"] == f"Bearer {KEY}"
    assert logged[1]["body"] is None and isinstance(first["t"], float)
    requests.delete(f"{url}/_mock/requests", timeout=5)
    assert requests.get(f"{url}/_mock/requests", timeout=5).json() == {"requests": []}


def test_missing_key_is_401(url: str) -> None:
    """Without --keys any Bearer key passes, but a missing Authorization header is a 401."""
    assert chat(url, headers={}).status_code == 401
    assert chat(url, headers={"Authorization": "Bearer anything"}).status_code == 200


def test_keys_flag_rejects_other_keys_and_sigterm_exits_cleanly() -> None:
    """With --keys only those keys pass (others: 401 invalid_api_key); SIGTERM ends the process with status 0."""
    proc, url = start_mock("--keys", "k1,k2", "--models", "only-model")
    try:
        assert chat(url, headers={"Authorization": "Bearer k2"}).status_code == 200
        rejected = chat(url, headers={"Authorization": "Bearer k3"})
        assert rejected.status_code == 401 and rejected.json()["error"]["code"] == "invalid_api_key"
        models = requests.get(f"{url}/v1/models", headers={"Authorization": "Bearer k1"}, timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["only-model"]
    finally:
        assert stop_mock(proc) == 0


def test_bad_faults_are_refused(url: str) -> None:
    """An unknown fault kind or a bad field is a 400 at queue time, not a surprise during the test."""
    for fault in (
        {"kind": "explode"},
        {"status": "500"},
        {"kind": "delay", "seconds": -1},
        {"status": 500, "times": 0},
    ):
        resp = requests.post(f"{url}/_mock/faults", json={"faults": [fault]}, timeout=5)
        assert resp.status_code == 400, fault
    assert requests.get(f"{url}/_mock/faults", timeout=5).json() == {"faults": []}


def test_keep_alive(url: str) -> None:
    """Several requests share one HTTP/1.1 connection (answers carry Content-Length, no Connection: close)."""
    conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=5)
    try:
        for _ in range(3):
            conn.request("POST", "/v1/chat/completions", json.dumps(CHAT), {**AUTH, "Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["choices"]
            assert resp.getheader("Connection") is None and not resp.will_close
        assert conn.sock is not None
    finally:
        conn.close()


def test_deepseek_shapes(url: str) -> None:
    """deepseek-reasoner: reasoning_content plain and streamed first; DeepSeek usage (cache split), on the last
    chunk of a stream that did not ask for usage."""
    body = {"model": "deepseek-reasoner", "messages": [{"role": "user", "content": "why"}]}
    plain = chat(url, body).json()
    message = plain["choices"][0]["message"]
    assert message["reasoning_content"] and message["content"] == "Mock answer to: why"
    usage = plain["usage"]
    assert usage["prompt_cache_hit_tokens"] + usage["prompt_cache_miss_tokens"] == usage["prompt_tokens"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] > 0
    events = [json.loads(line[6:]) for line in chat(url, {**body, "stream": True}).text.split("\n\n")
              if line.startswith("data: {")]
    assert events[1]["choices"][0]["delta"]["reasoning_content"] and events[1]["choices"][0]["delta"]["content"] is None
    assert events[-1]["usage"] == usage and events[-1]["choices"][0]["finish_reason"] == "stop"


def test_logprobs_and_per_model_faults(url: str) -> None:
    """logprobs: true with top_logprobs gives one entry per token; a fault with "model" hits only that model."""
    body = {**CHAT, "logprobs": True, "top_logprobs": 2}
    logprobs = chat(url, body).json()["choices"][0]["logprobs"]["content"]
    assert "".join(t["token"] for t in logprobs) == ANSWER and len(logprobs[0]["top_logprobs"]) == 2
    queue(url, {"model": "gpt-4o", "status": 429, "times": -1})
    assert chat(url).status_code == 200
    assert chat(url, {**CHAT, "model": "gpt-4o"}).status_code == 429


def test_wire_framing_fault(url: str) -> None:
    """The "wire" fault: gzip-encoded, CRLF-ended SSE in 5-byte writes, decoding to the usual stream."""
    queue(url, {"kind": "wire", "crlf": True, "split": 5, "gzip": True})
    response = chat(url, {**CHAT, "stream": True}, stream=True)
    assert response.headers["Content-Encoding"] == "gzip"
    text = response.content.decode()  # requests decodes the gzip
    assert "\r\n\r\n" in text and "\n\n" not in text.replace("\r\n", "")
    deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content") or ""
              for e in text.split("\r\n\r\n") if e.startswith("data: {")]
    assert "".join(deltas) == ANSWER
