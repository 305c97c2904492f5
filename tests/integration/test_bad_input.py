"""Broken requests get OpenAI-style JSON errors with the right status: never a 500, never a trace."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator

import pytest
import requests

from tests.support import Gateway, MockUpstream, base_env, openai_error

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

MAX_BODY_BYTES = 1000
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
MESSAGES = [{"role": "user", "content": "hi"}]


def valid_body(route: str) -> dict:
    if route == "/v1/chat/completions":
        return {"model": "mock-gpt", "messages": MESSAGES}
    if route == "/v1/completions":
        return {"model": "mock-gpt", "prompt": "hi"}
    return {"model": "text-embedding-3-small", "input": "hi"}


def with_fields(route: str, **fields: object) -> bytes:
    return json.dumps({**valid_body(route), **fields}).encode()


def without(route: str, name: str) -> bytes:
    body = valid_body(route)
    del body[name]
    return json.dumps(body).encode()


# (id, route filter or None for every POST route, body builder)
BROKEN: list[tuple[str, str | None, object]] = [
    ("not-json", None, lambda r: b"{this is not json"),
    ("json-array", None, lambda r: b'[{"model": "mock-gpt"}]'),
    ("json-string", None, lambda r: b'"hello"'),
    ("json-null", None, lambda r: b"null"),
    ("empty-body", None, lambda r: b""),
    ("model-missing", None, lambda r: without(r, "model")),
    ("model-int", None, lambda r: with_fields(r, model=42)),
    ("model-empty", None, lambda r: with_fields(r, model="")),
    ("stream-yes", None, lambda r: with_fields(r, stream="yes")),
    ("temperature-hot", None, lambda r: with_fields(r, temperature="hot")),
    ("n-0", None, lambda r: with_fields(r, n=0)),
    ("n-true", None, lambda r: with_fields(r, n=True)),
    ("invalid-utf8", None, lambda r: b'{"model": "mock-gpt", "x": "\xff\xfe\xfa"}'),
    ("lone-surrogate", None, lambda r: with_fields(r, model="mock-gpt").replace(b'"mock-gpt"', b'"mock\\ud800gpt"')),
    ("lone-surrogate-text", None, lambda r: with_fields(r, user="x").replace(b'"user": "x"', b'"user": "\\udfff"')),
    ("nan-literal", None, lambda r: with_fields(r)[:-1] + b', "temperature": NaN}'),
    ("messages-not-list", "/v1/chat/completions", lambda r: with_fields(r, messages="hi")),
    ("messages-empty", "/v1/chat/completions", lambda r: with_fields(r, messages=[])),
    ("messages-non-object", "/v1/chat/completions", lambda r: with_fields(r, messages=["hi"])),
    ("messages-role-int", "/v1/chat/completions", lambda r: with_fields(r, messages=[{"role": 1, "content": "x"}])),
    ("messages-missing", "/v1/chat/completions", lambda r: without(r, "messages")),
    ("prompt-missing", "/v1/completions", lambda r: without(r, "prompt")),
    ("input-missing", "/v1/embeddings", lambda r: without(r, "input")),
]
CASES = [
    pytest.param(route, build, id=f"{route.rsplit('/', 1)[1]}-{name}")
    for name, only, build in BROKEN
    for route in ROUTES
    if only in (None, route)
]


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, UPSTREAM_API_KEYS=f"sk-bad-input-{uuid.uuid4().hex}",
                          MAX_BODY_BYTES=str(MAX_BODY_BYTES), CACHE_ENABLED="false"))
    yield gw
    gw.stop()


@pytest.mark.parametrize(("route", "build"), CASES)
def test_broken_body_is_a_400_openai_error(gateway: Gateway, upstream: MockUpstream, route: str, build) -> None:  # noqa: ANN001
    """Each broken body on each POST route is a 400 with an OpenAI-style error, never forwarded upstream."""
    response = requests.post(gateway.url + route, data=build(route), headers={"Content-Type": "application/json"},
                             timeout=10)
    openai_error(response, 400)
    assert upstream.requests() == []


@pytest.mark.parametrize("route", ROUTES)
def test_body_over_max_body_bytes_is_413(gateway: Gateway, upstream: MockUpstream, route: str) -> None:
    """A body larger than MAX_BODY_BYTES is refused with 413 before reaching the upstream."""
    body = with_fields(route, padding="x" * MAX_BODY_BYTES)
    openai_error(requests.post(gateway.url + route, data=body, timeout=10), 413)
    assert upstream.requests() == []


def test_chunked_body_over_max_body_bytes_is_413(gateway: Gateway, upstream: MockUpstream) -> None:
    """A chunked body (no Content-Length) that grows past MAX_BODY_BYTES is refused too."""
    body = with_fields("/v1/chat/completions", padding="x" * MAX_BODY_BYTES)
    pieces = (body[i:i + 100] for i in range(0, len(body), 100))
    response = requests.post(gateway.url + "/v1/chat/completions", data=pieces, timeout=10)
    assert response.status_code in (400, 413), response.text
    openai_error(response, response.status_code)
    assert upstream.requests() == []


def test_body_just_under_the_limit_is_served(gateway: Gateway) -> None:
    """A valid body below MAX_BODY_BYTES goes through (the limit is not off by much)."""
    body = with_fields("/v1/chat/completions")
    body = body[:-1] + b', "user": "' + b"u" * (MAX_BODY_BYTES - len(body) - 20) + b'"}'
    assert len(body) < MAX_BODY_BYTES
    assert requests.post(gateway.url + "/v1/chat/completions", data=body, timeout=10).status_code == 200


@pytest.mark.parametrize("path", ["/v1/nope", "/v1/chat/completion", "/nope", "/v2/chat/completions"])
def test_unknown_route_is_404(gateway: Gateway, path: str) -> None:
    """An unknown path is a 404 OpenAI-style error."""
    openai_error(requests.post(gateway.url + path, json=valid_body(ROUTES[0]), timeout=10), 404)


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/chat/completions"), ("PUT", "/v1/completions"), ("DELETE", "/v1/embeddings"),
    ("POST", "/v1/models"),
])
def test_wrong_method_is_405(gateway: Gateway, method: str, path: str) -> None:
    """A known path with the wrong method is a 405 OpenAI-style error."""
    openai_error(requests.request(method, gateway.url + path, timeout=10), 405)


def test_incoming_request_id_is_echoed(gateway: Gateway) -> None:
    """An X-Request-ID sent by the client comes back unchanged, on success and on error."""
    for body in (valid_body(ROUTES[0]), {"model": 1}):
        request_id = f"client-{uuid.uuid4().hex}"
        response = requests.post(gateway.url + ROUTES[0], json=body, headers={"X-Request-ID": request_id},
                                 timeout=10)
        assert response.headers["X-Request-ID"] == request_id


def test_missing_request_id_is_generated(gateway: Gateway) -> None:
    """Without an X-Request-ID the gateway answers with a fresh one each time."""
    ids = {requests.post(gateway.url + ROUTES[0], json={"model": 1}, timeout=10).headers["X-Request-ID"]
           for _ in range(3)}
    assert len(ids) == 3
    assert all(re.fullmatch(r"[A-Za-z0-9._:\-]{8,128}", i) for i in ids)


def test_unusable_request_id_is_replaced(gateway: Gateway) -> None:
    """A request id with characters unsafe for logs is replaced by a fresh one rather than echoed."""
    response = requests.post(gateway.url + ROUTES[0], json={"model": 1}, headers={"X-Request-ID": "a b\"c"},
                             timeout=10)
    assert response.headers["X-Request-ID"] not in ("", 'a b"c')
