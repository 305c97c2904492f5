"""The upstream backends file and key pool: errors say where (never quoting a key); no usable key is explained."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from app.errors import NotFound, RateLimited, ServiceUnavailable
from app.upstream.client import UpstreamClient
from app.upstream.pool import Backend, KeyHealth, PoolConfigError, UpstreamKey, UpstreamPool, load_backends_file


def test_yaml_error_in_backends_file_does_not_quote_the_key(tmp_path: Path) -> None:
    """A syntax error on a line holding a key is reported by position, without the line's text."""
    path = tmp_path / "upstreams.yaml"
    path.write_text('backends:\n  - url: http://127.0.0.1:9\n    keys: [sk-secret-abc123, "sk-secret-def456\n')
    with pytest.raises(PoolConfigError) as info:
        load_backends_file(path)
    message = str(info.value)
    assert "UPSTREAMS_FILE" in message and "line" in message
    assert "sk-secret" not in message
    assert info.value.__cause__ is None  # a logged cause would quote the line again


def test_backends_file_keys_and_models_are_read(tmp_path: Path) -> None:
    """Keys (plain or weighted), models and model_map are read; a trailing slash of the URL is dropped."""
    path = tmp_path / "upstreams.yaml"
    path.write_text(
        "backends:\n"
        "  - name: a\n    url: http://127.0.0.1:9/v1/\n    keys: [k1, {key: k2, weight: 3}]\n"
        "    models: [m1]\n    model_map: {alias: m1}\n"
    )
    (backend,) = load_backends_file(path)
    assert backend.base_url == "http://127.0.0.1:9/v1"
    assert [k.weight for k in backend.keys] == [1.0, 3.0]
    assert "k1" not in repr(backend.keys[0])
    assert backend.serves("m1") and backend.serves("alias") and not backend.serves("other")
    assert backend.upstream_model("alias") == "m1"


def client_for(*backends: Backend) -> UpstreamClient:
    session = requests.Session()  # never used: these requests are refused before anything is sent
    return UpstreamClient(session, UpstreamPool(list(backends), KeyHealth(None)), connect_timeout=1, read_timeout=1)


def send(client: UpstreamClient, model: str) -> None:
    client.send("/v1/chat/completions", {"model": model}, b"{}", model=model, stream=False, request_id="r")


def test_every_key_disabled_is_503_not_unknown_model() -> None:
    """With the only key rejected by the upstream, requests get 503 (operator needed), not 404 (no such model)."""
    key = UpstreamKey(secret="sk-a", key_id="a")
    client = client_for(Backend(name="b", base_url="http://127.0.0.1:9", keys=(key,)))
    client.pool.health.disable("a")
    with pytest.raises(ServiceUnavailable):
        send(client, "mock-gpt")


def test_model_no_backend_serves_is_404() -> None:
    """A model outside every backend's list is a 404 model_not_found."""
    key = UpstreamKey(secret="sk-a", key_id="a")
    client = client_for(Backend(name="b", base_url="http://127.0.0.1:9", keys=(key,), models=("m1",)))
    with pytest.raises(NotFound):
        send(client, "other")


def test_every_key_cooling_is_429_with_retry_after() -> None:
    """With every key cooling down, the client is told when to come back."""
    key = UpstreamKey(secret="sk-a", key_id="a")
    client = client_for(Backend(name="b", base_url="http://127.0.0.1:9", keys=(key,)))
    client.pool.health.cool_down("a", 5.0)
    with pytest.raises(RateLimited) as info:
        send(client, "mock-gpt")
    assert 1 <= int(info.value.headers["Retry-After"]) <= 5
