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


def test_backend_names_must_be_unique(tmp_path: Path) -> None:
    """Two backends with one name are refused at start, naming the file, the name and both entries."""
    path = tmp_path / "upstreams.yaml"
    path.write_text(
        "backends:\n"
        "  - {name: main, url: 'http://127.0.0.1:9', keys: [k1]}\n"
        "  - {name: main, url: 'http://127.0.0.2:9', keys: [k2]}\n"
    )
    with pytest.raises(PoolConfigError) as info:
        load_backends_file(path)
    message = str(info.value)
    assert str(path) in message and "'main'" in message and "backends[1]" in message and "backends[0]" in message


def test_a_default_name_counts_as_a_name(tmp_path: Path) -> None:
    """A backend named like another's default name (backend0) is refused too."""
    path = tmp_path / "upstreams.yaml"
    path.write_text("backends:\n  - {url: 'http://127.0.0.1:9'}\n  - {name: backend0, url: 'http://127.0.0.2:9'}\n")
    with pytest.raises(PoolConfigError, match="backend0"):
        load_backends_file(path)


@pytest.mark.parametrize(("entry", "field"), [
    ("{name: bad, url: 'http://h', weight: 0}", "'weight'"),
    ("{name: bad, url: 'http://h', weight: -2}", "'weight'"),
    ("{name: bad, url: 'http://h', weight: heavy}", "'weight'"),
    ("{name: bad, url: 'http://h', weight: .inf}", "'weight'"),
    ("{name: bad, url: 'http://h', weight: .nan}", "'weight'"),
    ("{name: bad, url: 'http://h', weight: true}", "'weight'"),
    ("{name: bad, url: 'http://h', weight: null}", "'weight'"),
    ("{name: bad, url: 'http://h', keys: [{key: sk-secret-1, weight: 0}]}", "'keys[0].weight'"),
    ("{name: bad}", "'url'"),
    ("{name: bad, url: 42}", "'url'"),
    ("{name: bad, url: 'api.example.com'}", "'url'"),
    ("{name: bad, url: 'ftp://api.example.com'}", "'url'"),
    ("{name: bad, url: 'https://'}", "'url'"),
    ("{name: bad, url: 'http://h:99999'}", "'url'"),
    ("{name: bad, url: 'http://h/v1?x=1'}", "'url'"),
    ("{name: bad, url: 'http://h', keys: sk-secret-1}", "'keys'"),
    ("{name: bad, url: 'http://h', keys: []}", "'keys'"),
    ("{name: bad, url: 'http://h', keys: [sk-secret-1, 7]}", "'keys[1]'"),
    ("{name: bad, url: 'http://h', keys: [{key: ''}]}", "'keys[0]'"),
    ("{name: bad, url: 'http://h', models: gpt-4o}", "'models'"),
    ("{name: bad, url: 'http://h', models: [gpt-4o, 3.5]}", "'models'"),
    ("{name: bad, url: 'http://h', model_map: [a, b]}", "'model_map'"),
    ("{name: bad, url: 'http://h', model_map: {a: 1}}", "'model_map'"),
])
def test_bad_backend_field_is_refused_at_parse_time(tmp_path: Path, entry: str, field: str) -> None:
    """A bad field fails loading, naming the file, the backend (index and name) and the field; keys never quoted."""
    path = tmp_path / "upstreams.yaml"
    path.write_text(f"backends:\n  - {{name: good, url: 'http://127.0.0.1:9'}}\n  - {entry}\n")
    with pytest.raises(PoolConfigError) as info:
        load_backends_file(path)
    message = str(info.value)
    assert str(path) in message and "backends[1] ('bad')" in message and field in message
    assert "sk-secret" not in message


def test_numeric_weight_strings_and_keyless_backends_are_accepted(tmp_path: Path) -> None:
    """`weight: 1e3` (a string to YAML 1.1) is a number; a backend without `keys` is called without one."""
    path = tmp_path / "upstreams.yaml"
    path.write_text("backends:\n  - {name: local, url: 'http://vllm:8000/v1', weight: 1e3, models: [llama]}\n")
    (backend,) = load_backends_file(path)
    assert backend.weight == 1000.0
    assert [k.key_id for k in backend.keys] == ["anonymous"]


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
