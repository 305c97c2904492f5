"""build_authenticator and Authenticator: key parsing, tenants, the keys file, constant-time look-up."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from app import auth
from app.auth import AuthConfigError, Authenticator, Tenant, TenantLimits, build_authenticator
from app.errors import Forbidden, Unauthorized

NO_LIMITS = TenantLimits()


def build(*keys: str, keys_file: str | None = None, disabled: bool = False,
          limits: TenantLimits = NO_LIMITS) -> Authenticator:
    return build_authenticator(keys, keys_file, disabled=disabled, default_limits=limits)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    return str(path)


def test_tenant_colon_key_names_the_tenant() -> None:
    """`acme:sk-1` authenticates `Bearer sk-1` as tenant acme."""
    assert build("acme:sk-1").authenticate("Bearer sk-1").name == "acme"


def test_bare_key_tenant_is_a_short_fingerprint() -> None:
    """A bare key's tenant is `key-` + the first 8 hex digits of its SHA-256, never the key."""
    tenant = build("sk-bare-secret").authenticate("Bearer sk-bare-secret")
    assert tenant.name == "key-" + hashlib.sha256(b"sk-bare-secret").hexdigest()[:8]
    assert "secret" not in tenant.name


def test_key_may_contain_a_colon_after_the_tenant() -> None:
    """Only the first colon separates tenant and key."""
    assert build("acme:sk:with:colons").authenticate("Bearer sk:with:colons").name == "acme"


def test_missing_header_is_401() -> None:
    """No Authorization header: 401 invalid_api_key asking for a Bearer key."""
    with pytest.raises(Unauthorized) as caught:
        build("acme:sk-1").authenticate(None)
    assert caught.value.status == 401 and "Bearer" in caught.value.message


@pytest.mark.parametrize("header", ["Bearer sk-2", "Basic sk-1", "sk-1", "Bearer ", ""])
def test_wrong_or_malformed_key_is_401(header: str) -> None:
    """An unknown key, another scheme or an empty key is refused."""
    with pytest.raises(Unauthorized):
        build("acme:sk-1").authenticate(header)


def test_surrounding_whitespace_of_the_key_is_ignored() -> None:
    """`Bearer  sk-1 ` still matches sk-1."""
    assert build("acme:sk-1").authenticate("Bearer  sk-1 ").name == "acme"


def test_every_known_digest_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """The look-up compares against every key with compare_digest: no early exit whose timing leaks."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    authenticator = build("a:sk-a", "b:sk-b", "c:sk-c")
    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    assert authenticator.authenticate("Bearer sk-a").name == "a"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(Unauthorized):
        authenticator.authenticate("Bearer nope")
    assert len(calls) == 3
    assert all(presented == hashlib.sha256(b"nope").digest() for _known, presented in calls)


def test_keys_are_held_only_as_digests() -> None:
    """The authenticator keeps no plaintext key."""
    authenticator = build("acme:sk-plaintext-1")
    assert "sk-plaintext-1" not in repr(vars(authenticator))


def test_no_keys_and_auth_enabled_refuses_to_build() -> None:
    """Without keys the gateway would be open: the error names GATEWAY_API_KEYS and AUTH_DISABLED."""
    with pytest.raises(AuthConfigError) as caught:
        build()
    assert "GATEWAY_API_KEYS" in str(caught.value) and "AUTH_DISABLED" in str(caught.value)


def test_auth_disabled_lets_everyone_in_as_the_default_tenant() -> None:
    """AUTH_DISABLED: any header (or none) is the dev tenant with the default limits."""
    limits = TenantLimits(rpm=5)
    authenticator = build(disabled=True, limits=limits)
    for header in (None, "Bearer whatever"):
        tenant = authenticator.authenticate(header)
        assert tenant.name == auth.DEV_TENANT and tenant.limits == limits
    assert [t.name for t in authenticator.tenants] == [auth.DEV_TENANT]


def test_env_keys_get_the_default_limits() -> None:
    """Tenants from GATEWAY_API_KEYS carry RATE_LIMIT_* defaults."""
    limits = TenantLimits(rpm=10, tpm=100, concurrency=2)
    assert build("acme:sk-1", limits=limits).authenticate("Bearer sk-1").limits == limits


def test_keys_file_tenants(tmp_path: Path) -> None:
    """The YAML file: keys and key_sha256, limits over defaults, allowed models and per-model limits."""
    hashed = hashlib.sha256(b"sk-hashed").hexdigest()
    path = write(tmp_path, f"""
tenants:
  - name: team-a
    keys: [sk-a1, sk-a2]
    limits: {{rpm: 100}}
    models: [gpt-4o-mini]
    model_limits:
      gpt-4o-mini: {{tpm: 5000}}
  - name: team-b
    key_sha256: ["{hashed}"]
""")
    authenticator = build(keys_file=path, limits=TenantLimits(rpm=1, tpm=2, concurrency=3))
    a1 = authenticator.authenticate("Bearer sk-a1")
    assert a1 is authenticator.authenticate("Bearer sk-a2")
    assert a1.name == "team-a"
    assert a1.limits == TenantLimits(rpm=100, tpm=2, concurrency=3)
    assert a1.model_limits == {"gpt-4o-mini": TenantLimits(tpm=5000)}
    a1.check_model("gpt-4o-mini")
    with pytest.raises(Forbidden) as caught:
        a1.check_model("gpt-4o")
    assert caught.value.status == 403
    b = authenticator.authenticate("Bearer sk-hashed")
    assert b.name == "team-b" and b.models is None and b.limits == TenantLimits(1, 2, 3)
    b.check_model("anything")


def test_keys_file_and_env_keys_combine(tmp_path: Path) -> None:
    """GATEWAY_API_KEYS and GATEWAY_KEYS_FILE both count."""
    path = write(tmp_path, "tenants: [{name: filed, keys: [sk-f]}]")
    authenticator = build("env:sk-e", keys_file=path)
    assert {t.name for t in authenticator.tenants} == {"env", "filed"}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("tenants: [", "GATEWAY_KEYS_FILE"),
        ("just a string", "'tenants' list"),
        ("tenants: [{keys: [sk-1]}]", "tenants[0]: needs a 'name'"),
        ("tenants: [{name: a}]", "tenants[0]: needs 'keys' or 'key_sha256'"),
        ("tenants: [{name: a, keys: [k], limits: {rpm: lots}}]", "limits are integers"),
        ("tenants: [{name: a, key_sha256: [not-hex]}]", "tenants[0]"),
        ("tenants: [{name: a, key_sha256: [abcd]}]", "tenants[0]"),
        ("tenants: [{name: a, keys: ['']}]", "tenants[0]: a key is empty"),
    ],
)
def test_bad_keys_file_names_the_problem(tmp_path: Path, text: str, words: str) -> None:
    """A broken keys file is one AuthConfigError saying where, never a stray ValueError."""
    with pytest.raises(AuthConfigError) as caught:
        build(keys_file=write(tmp_path, text))
    assert words in str(caught.value)


def test_missing_keys_file_is_a_config_error(tmp_path: Path) -> None:
    """A keys file that cannot be read is an AuthConfigError naming GATEWAY_KEYS_FILE."""
    with pytest.raises(AuthConfigError, match="GATEWAY_KEYS_FILE"):
        build(keys_file=str(tmp_path / "absent.yaml"))


def test_empty_key_is_refused_at_start() -> None:
    """`tenant:` with nothing after the colon would let `Bearer ` (an empty key) in: refused at start."""
    with pytest.raises(AuthConfigError, match="GATEWAY_API_KEYS"):
        build("acme:")


def test_tenant_without_model_list_may_use_any_model() -> None:
    """models None means every model."""
    Tenant(name="t").check_model("whatever")
