"""Run-time keys without Redis: the admin bodies' checks, the public view, and how the Authenticator asks."""

from __future__ import annotations

import time
from typing import Any

import pytest

from app.auth import AuthConfigError, Tenant, TenantLimits, build_authenticator, digest
from app.errors import BadRequest, Unauthorized
from app.keys.service import KEY_PREFIX, _changes, _object, public


class StubRuntime:
    """Stands in for KeyService: knows one run-time key."""

    def __init__(self, key: str) -> None:
        self.known = digest(key)
        self.asked: list[bytes] = []

    def claims(self, key: str) -> bool:
        return key.startswith(KEY_PREFIX)

    def authenticate(self, key_digest: bytes, budget: Any) -> Tenant:
        self.asked.append(key_digest)
        if key_digest != self.known:
            raise Unauthorized("Incorrect API key provided.")
        return Tenant(name="runtime")


def test_static_keys_never_reach_the_runtime_lookup() -> None:
    """A static key (even of the run-time shape) is answered from memory; only unknown `sk-gwr-` keys are asked."""
    auth = build_authenticator(("team:sk-static", "gw:sk-gwr-static"), None, disabled=False,
                               default_limits=TenantLimits())
    runtime = auth.runtime = StubRuntime("sk-gwr-runtime")
    assert auth.authenticate("Bearer sk-static").name == "team"
    assert auth.authenticate("Bearer sk-gwr-static").name == "gw"
    assert runtime.asked == []
    assert auth.authenticate("Bearer sk-gwr-runtime").name == "runtime"
    with pytest.raises(Unauthorized):
        auth.authenticate("Bearer sk-other")
    with pytest.raises(Unauthorized):
        auth.authenticate("Bearer sk-gwr-unknown")
    assert runtime.asked == [digest("sk-gwr-runtime"), digest("sk-gwr-unknown")]


def test_sources_of_static_keys(tmp_path: Any) -> None:
    """The listing tells keys from GATEWAY_API_KEYS (env) from those of GATEWAY_KEYS_FILE (file)."""
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("tenants:\n  - name: filed\n    keys: [sk-file]\n")
    auth = build_authenticator(("env:sk-env",), str(keys_file), disabled=False, default_limits=TenantLimits())
    assert {(t.name, source) for _, t, source in auth.static_keys()} == {("env", "env"), ("filed", "file")}


def test_no_static_keys_is_fine_with_the_admin_api() -> None:
    """Keys can come from the admin API: no static key is no longer "running open"; without it, still an error."""
    assert build_authenticator((), None, disabled=False, default_limits=TenantLimits(), runtime_keys=True)
    with pytest.raises(AuthConfigError):
        build_authenticator((), None, disabled=False, default_limits=TenantLimits())


@pytest.mark.parametrize("fields, param", [
    ({"name": 3}, "name"),
    ({"name": "x" * 257}, "name"),
    ({"limits": {"rpm": True}}, "limits"),
    ({"limits": {"rpm": 1.5}}, "limits"),
    ({"limits": []}, "limits"),
    ({"models": []}, "models"),
    ({"models": [""]}, "models"),
    ({"expires_at": "tomorrow"}, "expires_at"),
    ({"expires_at": True}, "expires_at"),
    ({"expires_at": 10}, "expires_at"),
    ({"metadata": {"big": "x" * 5000}}, "metadata"),
])
def test_bad_fields_name_their_param(fields: dict[str, Any], param: str) -> None:
    """Each bad value is a 400 naming the field."""
    with pytest.raises(BadRequest) as caught:
        _changes(fields, time.time())
    assert caught.value.param == param and caught.value.body()["error"]["param"] == param


def test_good_fields_are_kept() -> None:
    """Valid values pass through; models are de-duplicated; null means "the default"."""
    now = time.time()
    changes = _changes({"name": None, "limits": {"rpm": 0, "tpm": 5}, "models": ["b", "a", "b"],
                        "expires_at": now + 60, "metadata": {"team": "x"}}, now)
    assert changes == {"name": None, "limits": {"rpm": 0, "tpm": 5}, "models": ["a", "b"],
                       "expires_at": now + 60, "metadata": {"team": "x"}}
    assert _changes({"limits": None, "models": None}, now) == {"limits": None, "models": None}


def test_unknown_fields_and_non_objects_are_refused() -> None:
    with pytest.raises(BadRequest):
        _object([], frozenset({"name"}))
    with pytest.raises(BadRequest) as caught:
        _object({"name": "x", "key": "sk-gwr-chosen"}, frozenset({"name"}))
    assert caught.value.param == "key"


def test_public_view_has_no_digests() -> None:
    """What the admin API answers: no digest, no secret; the end of a rotation's grace when one is running."""
    record = {"id": "key_1", "prefix": "sk-gwr-abcd", "tenant": "t", "name": None, "limits": None, "models": None,
              "created_at": 1.0, "expires_at": None, "metadata": {},
              "digests": [{"digest": "ab" * 32, "not_after": 99.0}, {"digest": "cd" * 32, "not_after": None}]}
    view = public(record)
    assert "digests" not in view and "ab" * 32 not in str(view) and view["source"] == "api"
    assert view["previous_key_expires_at"] == 99.0 and view["last_used_at"] is None
