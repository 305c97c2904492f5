"""Small wire gaps, each a client that broke: models.retrieve, no /v1, trailing slash, `bearer`, gzip bodies,
405 Allow, the upstream's own headers passed on, and a stream's usage only when the client asked for it."""

from __future__ import annotations

import gzip
import json
import time
import uuid
import zlib
from collections.abc import Iterator

import openai
import pytest
import requests

from tests.support import Gateway, MockUpstream, base_env, openai_error

pytestmark = [pytest.mark.e2e, pytest.mark.gunicorn, pytest.mark.redis]

CLIENT_KEY = f"sk-wire-client-{uuid.uuid4().hex}"
MAX_BODY = 200_000


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, UPSTREAM_API_KEYS=f"sk-wire-{uuid.uuid4().hex}", AUTH_DISABLED="false",
                          GATEWAY_API_KEYS=f"wire:{CLIENT_KEY}", UPSTREAM_MAX_RETRIES="0",
                          MAX_BODY_BYTES=str(MAX_BODY), CACHE_ENABLED="false"))
    yield gw
    gw.stop()


AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


def chat(question: str | None = None, **extra: object) -> dict:
    return {"model": "mock-gpt", "messages": [{"role": "user", "content": question or uuid.uuid4().hex}], **extra}


def test_models_retrieve(gateway: Gateway, upstream: MockUpstream) -> None:
    """The SDK's models.retrieve: the upstream's model object; an unknown model is a 404."""
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    model = sdk.models.retrieve("gpt-4o")
    assert model.id == "gpt-4o" and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("no-such-model")
    sdk.close()


def test_base_url_without_v1(gateway: Gateway, upstream: MockUpstream) -> None:
    """DeepSeek's documented base URL has no /v1: chat, streams and the model list work through it."""
    sdk = openai.OpenAI(base_url=gateway.url, api_key=CLIENT_KEY, max_retries=0)
    answer = sdk.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "no v1"}])
    assert answer.choices[0].message.content == "Mock answer to: no v1"
    text = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
        model="mock-gpt", messages=[{"role": "user", "content": "no v1"}], stream=True) if c.choices)
    assert text == "Mock answer to: no v1"
    assert "gpt-4o" in [m.id for m in sdk.models.list()]
    sdk.close()
    assert upstream.requests()[0]["path"] == "/v1/chat/completions"


def test_trailing_slash_and_lowercase_bearer(gateway: Gateway, upstream: MockUpstream) -> None:
    """`/v1/chat/completions/` is the same route; `Authorization: bearer <key>` is the same key."""
    response = requests.post(gateway.url + "/v1/chat/completions/", json=chat(), headers=AUTH, timeout=10)
    assert response.status_code == 200
    response = requests.post(gateway.url + "/v1/chat/completions", json=chat(), timeout=10,
                             headers={"Authorization": f"bearer {CLIENT_KEY}"})
    assert response.status_code == 200
    assert requests.post(gateway.url + "/v1/chat/completions", json=chat(), timeout=10,
                         headers={"Authorization": "bearer wrong"}).status_code == 401


def test_gzip_request_body(gateway: Gateway, upstream: MockUpstream) -> None:
    """A gzip (or deflate) body is decoded; another encoding is a 415 naming it; a body that inflates past
    MAX_BODY_BYTES is a 413."""
    body = chat("zipped question")
    for data, encoding in ((gzip.compress(json.dumps(body).encode()), "gzip"),
                           (zlib.compress(json.dumps(body).encode()), "deflate")):
        response = requests.post(gateway.url + "/v1/chat/completions", data=data, timeout=10,
                                 headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": encoding})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "Mock answer to: zipped question"
    assert upstream.requests()[-1]["body"] == body
    response = requests.post(gateway.url + "/v1/chat/completions", data=b"\x00\x01", timeout=10,
                             headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": "br"})
    assert openai_error(response, 415)["message"].startswith("Content-Encoding 'br'")
    bomb = chat("x" * (MAX_BODY * 2))
    response = requests.post(gateway.url + "/v1/chat/completions", data=gzip.compress(json.dumps(bomb).encode()),
                             headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": "gzip"},
                             timeout=10)
    openai_error(response, 413)
    response = requests.post(gateway.url + "/v1/chat/completions", data=b"\x1f\x8bnot gzip", timeout=10,
                             headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": "gzip"})
    openai_error(response, 400)


def test_405_says_allow(gateway: Gateway) -> None:
    """A wrong method is a 405 OpenAI error with `Allow` naming the right one."""
    response = requests.get(gateway.url + "/v1/chat/completions", headers=AUTH, timeout=10)
    openai_error(response, 405)
    assert "POST" in response.headers["Allow"]


def test_upstream_headers_are_passed_on(gateway: Gateway, upstream: MockUpstream) -> None:
    """The upstream's x-ratelimit-*, openai-* and Retry-After reach the client, plain and streamed."""
    passed = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
              "x-ratelimit-reset-requests": "1s", "openai-processing-ms": "12", "openai-organization": "org-mock"}
    upstream.faults({"kind": "headers", "headers": passed, "times": 2})
    for stream in (False, True):
        response = requests.post(gateway.url + "/v1/chat/completions", json=chat(stream=stream), headers=AUTH,
                                 timeout=10)
        assert response.status_code == 200
        assert {k: response.headers.get(k) for k in passed} == passed
    upstream.faults({"status": 503, "retry_after": 7})
    response = requests.post(gateway.url + "/v1/chat/completions", json=chat(), headers=AUTH, timeout=10)
    assert response.status_code == 503 and response.headers["Retry-After"] == "7"


def test_stream_without_include_usage_has_no_usage_fields(gateway: Gateway, upstream: MockUpstream) -> None:
    """The gateway asks the upstream for usage (token accounting) but the client's wire has no usage at all;
    asked for, it comes as OpenAI sends it."""
    request_id = f"wire-{uuid.uuid4().hex}"
    response = requests.post(gateway.url + "/v1/chat/completions", json=chat(stream=True), timeout=10,
                             headers={**AUTH, "X-Request-ID": request_id})
    assert response.status_code == 200 and "usage" not in response.text
    assert upstream.requests()[-1]["body"]["stream_options"] == {"include_usage": True}
    time.sleep(0.2)
    (line,) = [r for r in gateway.request_lines() if r["request_id"] == request_id]
    assert line["completion_tokens"] > 0
    asked = requests.post(gateway.url + "/v1/chat/completions", timeout=10, headers=AUTH,
                          json=chat(stream=True, stream_options={"include_usage": True}))
    chunks = [json.loads(e[6:]) for e in asked.text.split("\n\n") if e.startswith("data: {")]
    assert all("usage" in c for c in chunks) and chunks[-1]["usage"]["total_tokens"] > 0
