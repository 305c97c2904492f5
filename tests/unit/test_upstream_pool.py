"""app/upstream/backends.py, health.py and pool.py: backends (from the settings or the YAML file, whose errors
say where without quoting a key), key choice, one worker's key health, and the refusals when no key is usable
(sharing the health through Redis: tests/integration)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import requests

from app.errors import NotFound, RateLimited, ServiceUnavailable
from app.upstream import health as health_module
from app.upstream.backends import (
    Backend,
    PoolConfigError,
    UpstreamKey,
    backends_from_settings,
    key_fingerprint,
    load_backends_file,
)
from app.upstream.client import UpstreamClient
from app.upstream.health import DISABLED, KeyHealth
from app.upstream.pool import UpstreamPool


def key(secret: str, weight: float = 1.0) -> UpstreamKey:
    return UpstreamKey(secret=secret, key_id=key_fingerprint(secret), weight=weight)


def test_fingerprint_is_short_and_not_the_key() -> None:
    """key_id: 8 hex digits of the key's SHA-256."""
    assert key_fingerprint("sk-secret") == hashlib.sha256(b"sk-secret").hexdigest()[:8]
    assert "secret" not in repr(key("sk-secret"))


def test_default_backend_from_settings() -> None:
    """TARGET_URL + UPSTREAM_API_KEYS make one backend serving any model."""
    (backend,) = backends_from_settings("http://up", ("k1", "k2"), None)
    assert backend.base_url == "http://up"
    assert [k.key_id for k in backend.keys] == [key_fingerprint("k1"), key_fingerprint("k2")]
    assert backend.serves("anything") and backend.serves(None)


def test_backend_without_keys_is_called_anonymously() -> None:
    """No upstream key: one anonymous key without a secret (no Authorization header)."""
    (backend,) = backends_from_settings("http://up", (), None)
    assert [(k.secret, k.key_id) for k in backend.keys] == [("", "anonymous")]


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


def test_backends_file(tmp_path: Path) -> None:
    """The YAML file: url (a trailing slash dropped), keys (plain or weighted), models, model_map, weight; a backend
    without a name is named by its position."""
    path = tmp_path / "up.yaml"
    path.write_text("""
backends:
  - name: a
    url: http://a/v1/
    keys: [ka1, {key: ka2, weight: 3}]
    models: [m1]
    model_map: {alias: real}
    weight: 2
  - url: http://b
""")
    a, b = load_backends_file(path)
    assert (a.name, a.base_url, a.weight) == ("a", "http://a/v1", 2.0)
    assert [k.weight for k in a.keys] == [1.0, 3.0]
    assert "ka1" not in repr(a.keys[0])
    assert a.serves("m1") and a.serves("alias") and not a.serves("other")
    assert a.upstream_model("alias") == "real" and a.upstream_model("m1") == "m1"
    assert b.name == "backend1" and b.serves("other")


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


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("backends: [", "UPSTREAMS_FILE"),
        ("backends: []", "non-empty 'backends' list"),
        ("backends: [{name: x}]", "backends[0] ('x'): needs a 'url'"),
        ("backends: [{url: 'http://a', keys: [[1]]}]", "'keys[0]' must be a non-empty string or {key, weight}"),
        ("backends: [{url: 'http://a', models: m1}]", "'models' must be a list"),
    ],
)
def test_bad_backends_file(tmp_path: Path, text: str, words: str) -> None:
    """A broken backends file is one PoolConfigError saying where."""
    path = tmp_path / "up.yaml"
    path.write_text(text)
    with pytest.raises(PoolConfigError) as caught:
        load_backends_file(path)
    assert words in str(caught.value)


def test_model_ids_lists_configured_models_once() -> None:
    """model_ids: every model and alias named, first occurrence order, no duplicates."""
    backends = [Backend("a", "http://a", (key("k"),), models=("m1", "m2"), model_map={"alias": "m1"}),
                Backend("b", "http://b", (key("j"),), models=("m2", "m3"))]
    assert UpstreamPool(backends, KeyHealth(None)).model_ids() == ["m1", "m2", "alias", "m3"]


def test_candidates_skip_cooling_keys_and_report_the_soonest_recovery() -> None:
    """A cooling key is not offered; with none left, the earliest recovery time comes back."""
    k1, k2 = key("k1"), key("k2")
    health = KeyHealth(None)
    pool = UpstreamPool([Backend("a", "http://a", (k1, k2))], health)
    health.cool_down(k1.key_id, 30, now=1000.0, model="m")
    ordered, _ = pool.candidates("m", now=1001.0)
    assert [k.key_id for _b, k in ordered] == [k2.key_id]
    health.cool_down(k2.key_id, 10, now=1000.0, model="m")
    ordered, soonest = pool.candidates("m", now=1001.0)
    assert ordered == [] and soonest == 1010.0
    ordered, _ = pool.candidates("m", now=1011.0)
    assert [k.key_id for _b, k in ordered] == [k2.key_id]


def test_unknown_model_has_no_candidates_and_no_recovery() -> None:
    """No backend serves the model: no candidate, soonest infinite (a 404, not a 429)."""
    pool = UpstreamPool([Backend("a", "http://a", (key("k"),), models=("m1",))], KeyHealth(None))
    assert pool.candidates("other") == ([], float("inf"))


def test_least_loaded_key_first() -> None:
    """Keys are ordered by requests in flight relative to weight."""
    k1, k2 = key("k1"), key("k2", weight=2.0)
    pool = UpstreamPool([Backend("a", "http://a", (k1, k2))], KeyHealth(None))
    pool.acquire(k1)
    assert [k.key_id for _b, k in pool.candidates(None)[0]] == [k2.key_id, k1.key_id]
    pool.acquire(k2)
    pool.acquire(k2)  # 2 in flight / weight 2 = 1 = k1's 1 / 1: a tie, either order
    pool.acquire(k2)
    assert [k.key_id for _b, k in pool.candidates(None)[0]] == [k1.key_id, k2.key_id]
    for _ in range(5):
        pool.release(k1)
    assert [k.key_id for _b, k in pool.candidates(None)[0]][0] == k1.key_id


def test_backoff_without_retry_after_grows() -> None:
    """429s without Retry-After: 2, 4, 8 ... seconds; a success resets the strikes."""
    health = KeyHealth(None)
    assert health.cool_down("k", None, now=0.0) == 2.0
    assert health.cool_down("k", None, now=0.0) == 4.0
    health.record_success("k")
    assert health.cool_down("k", None, now=0.0) == 2.0


def test_consecutive_failures_eject_for_a_growing_interval() -> None:
    """EJECT_AFTER_FAILURES 5xx in a row eject (key, model) for EJECT_BASE_SECONDS; the next ejection lasts longer."""
    health = KeyHealth(None)
    n = health_module.EJECT_AFTER_FAILURES
    results = [health.record_failure("k", "m", now=100.0) for _ in range(n)]
    assert results[-1] is True and not any(results[:-1])
    assert health.ejected_until("k", 100.0, "m") == 100.0 + health_module.EJECT_BASE_SECONDS
    assert health.ejected_until("k", 100.0, "other") == 0.0  # another model of the key is not ejected
    assert health.cooling_until("k", 100.0, "m") == 0.0  # an ejection is not a rate limit
    for _ in range(n):
        health.record_failure("k", "m", now=200.0)
    assert health.ejected_until("k", 200.0, "m") == 200.0 + 2 * health_module.EJECT_BASE_SECONDS
    for _ in range(n):  # a connection failure ejects the whole key
        health.record_failure("k", None, now=300.0)
    assert health.ejected_until("k", 300.0, "other") == 300.0 + health_module.EJECT_BASE_SECONDS


def test_ejection_never_benches_the_last_healthy_key() -> None:
    """Panic threshold: an ejected only key stays in use; of two keys, one ejected is left out."""
    k1, k2 = key("k1"), key("k2")
    health = KeyHealth(None)
    for _ in range(health_module.EJECT_AFTER_FAILURES):
        health.record_failure(k1.key_id, "m", now=1000.0)
    single = UpstreamPool([Backend("a", "http://a", (k1,))], health)
    assert [k.key_id for _b, k in single.candidates("m", now=1001.0)[0]] == [k1.key_id]
    pair = UpstreamPool([Backend("a", "http://a", (k1, k2))], health)
    assert [k.key_id for _b, k in pair.candidates("m", now=1001.0)[0]] == [k2.key_id]
    assert len(pair.candidates("other", now=1001.0)[0]) == 2
    for _ in range(health_module.EJECT_AFTER_FAILURES):
        health.record_failure(k2.key_id, "m", now=1000.0)
    assert len(pair.candidates("m", now=1001.0)[0]) == 2  # every key ejected: panic, all in use


def test_per_model_cooldown_and_key_wide_disable() -> None:
    """A 429 for one model rests the key for that model only; a 401 disables it for every model."""
    k1 = key("k1")
    health = KeyHealth(None)
    pool = UpstreamPool([Backend("a", "http://a", (k1,))], health)
    health.cool_down(k1.key_id, 30, now=1000.0, model="a")
    assert pool.candidates("a", now=1001.0)[0] == []
    assert len(pool.candidates("b", now=1001.0)[0]) == 1
    health.disable(k1.key_id)
    assert pool.candidates("b", now=1001.0)[0] == []
    health.restore(k1.key_id)
    assert len(pool.candidates("a", now=1001.0)[0]) == 1


def test_a_key_out_of_credit_is_tried_last() -> None:
    """402 / insufficient_quota: the key is not rested, only put behind the keys that still have credit."""
    k1, k2 = key("k1"), key("k2")
    health = KeyHealth(None)
    pool = UpstreamPool([Backend("a", "http://a", (k1, k2))], health)
    health.deplete(k1.key_id, now=1000.0)
    for _ in range(5):
        assert [k.key_id for _b, k in pool.candidates("m", now=1001.0)[0]] == [k2.key_id, k1.key_id]


def test_states() -> None:
    """ok, cooling, disabled."""
    health = KeyHealth(None)
    health.cool_down("c", 10, now=0.0)
    health.disable("d")
    assert [health.state(k, 1.0) for k in ("ok", "c", "d")] == ["ok", "cooling", "disabled"]
    assert health.cooling_until("d", 1.0) == DISABLED


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
    client.pool.health.cool_down("a", 5.0, model="mock-gpt")
    with pytest.raises(RateLimited) as info:
        send(client, "mock-gpt")
    assert 1 <= int(info.value.headers["Retry-After"]) <= 5
