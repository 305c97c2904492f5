"""Upstream backends, key choice and one worker's key health (sharing through Redis: tests/integration)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from app.upstream import pool as pool_module
from app.upstream.pool import (
    DISABLED,
    Backend,
    KeyHealth,
    PoolConfigError,
    UpstreamKey,
    UpstreamPool,
    backends_from_settings,
    key_fingerprint,
    load_backends_file,
)


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


def test_backends_file(tmp_path: Path) -> None:
    """The YAML file: url, keys (with weights), models and model_map."""
    path = tmp_path / "up.yaml"
    path.write_text("""
backends:
  - name: a
    url: http://a/
    keys: [ka1, {key: ka2, weight: 3}]
    models: [m1]
    model_map: {alias: real}
    weight: 2
  - url: http://b
""")
    a, b = load_backends_file(path)
    assert (a.name, a.base_url, a.weight) == ("a", "http://a", 2.0)
    assert [k.weight for k in a.keys] == [1.0, 3.0]
    assert a.serves("m1") and a.serves("alias") and not a.serves("other")
    assert a.upstream_model("alias") == "real" and a.upstream_model("m1") == "m1"
    assert b.name == "backend1" and b.serves("other")


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
    health.cool_down(k1.key_id, 30, now=1000.0)
    ordered, _ = pool.candidates("m", now=1001.0)
    assert [k.key_id for _b, k in ordered] == [k2.key_id]
    health.cool_down(k2.key_id, 10, now=1000.0)
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


def test_repeated_failures_cool_a_key_briefly(monkeypatch: pytest.MonkeyPatch) -> None:
    """FAILURES_BEFORE_COOLDOWN 5xx in a row put the key aside for FAILURE_COOLDOWN seconds."""
    monkeypatch.setattr(pool_module.time, "time", lambda: 100.0)
    health = KeyHealth(None)
    results = [health.record_failure("k") for _ in range(pool_module.FAILURES_BEFORE_COOLDOWN)]
    assert results[-1] is True and not any(results[:-1])
    assert health.cooling_until("k", 100.0) == 100.0 + pool_module.FAILURE_COOLDOWN


def test_states() -> None:
    """ok, cooling, disabled."""
    health = KeyHealth(None)
    health.cool_down("c", 10, now=0.0)
    health.disable("d")
    assert [health.state(k, 1.0) for k in ("ok", "c", "d")] == ["ok", "cooling", "disabled"]
    assert health.cooling_until("d", 1.0) == DISABLED
