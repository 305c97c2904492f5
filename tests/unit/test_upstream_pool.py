"""The upstream backends file: errors say where, and never quote a key."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.upstream.pool import PoolConfigError, load_backends_file


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
