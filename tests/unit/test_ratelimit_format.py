"""Pure parts of the rate limiter: duration format, headers, limits, key building."""

from __future__ import annotations

import pytest
import redis

from app.ratelimit import DimensionState, Limits, RateLimiter
from app.ratelimit.admission import format_duration, rate_limit_headers


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-3, "0s"),
        (0.02, "20ms"),
        (0.0201, "21ms"),
        (0.0004, "1ms"),
        (0.999, "999ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (2.113, "2.113s"),
        (59.9921, "59.993s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (61.25, "1m1.25s"),
        (3600, "1h0m0s"),
        (3723.4, "1h2m3.4s"),
    ],
)
def test_format_duration_matches_openai_style(seconds: float, text: str) -> None:
    """Durations use Go's form at millisecond precision, rounded up."""
    assert format_duration(seconds) == text


def test_headers_for_requests_and_tokens() -> None:
    """Each dimension that is on gets its limit, remaining and reset headers."""
    headers = rate_limit_headers(
        [
            DimensionState("requests", 10, 7, 18.0),
            DimensionState("tokens", 1000, 400, 36.0),
            DimensionState("concurrency", 4, 3, 0.0),
        ]
    )
    assert headers == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "7",
        "x-ratelimit-reset-requests": "18s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "400",
        "x-ratelimit-reset-tokens": "36s",
    }


def test_headers_only_for_dimensions_that_are_on() -> None:
    """A tenant with only a request limit gets no token headers."""
    headers = rate_limit_headers([DimensionState("requests", 5, 4, 12.0)])
    assert set(headers) == {
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    }
    assert rate_limit_headers([]) == {}


def test_headers_report_the_tighter_of_tenant_and_model_limits() -> None:
    """When a model limit is tighter than the tenant's, the model's numbers are shown."""
    headers = rate_limit_headers([DimensionState("requests", 100, 50, 30.0), DimensionState("requests", 5, 1, 48.0)])
    assert headers["x-ratelimit-limit-requests"] == "5"
    assert headers["x-ratelimit-remaining-requests"] == "1"
    assert headers["x-ratelimit-reset-requests"] == "48s"


@pytest.mark.parametrize(("retry", "header"), [(0.0001, "1"), (1.0, "1"), (1.2, "2"), (59.9, "60")])
def test_retry_after_is_whole_seconds_at_least_one(retry: float, header: str) -> None:
    """Retry-After rounds up to whole seconds and is never 0."""
    headers = rate_limit_headers([DimensionState("requests", 1, 0, retry)], retry)
    assert headers["Retry-After"] == header


def test_no_retry_after_when_admitted() -> None:
    """An admitted request carries no Retry-After."""
    assert "Retry-After" not in rate_limit_headers([DimensionState("tokens", 9, 8, 1.0)])


@pytest.mark.parametrize(
    "kwargs",
    [{"rpm": -1}, {"tpm": 1.5}, {"concurrency": True}, {"window_seconds": 0}],
)
def test_limits_reject_nonsense(kwargs: dict[str, object]) -> None:
    """Negative, fractional or boolean limits and empty windows fail at construction."""
    with pytest.raises(ValueError):
        Limits(**kwargs)  # type: ignore[arg-type]


def test_limits_enabled() -> None:
    """All-zero limits are off."""
    assert not Limits().enabled
    assert Limits(concurrency=1).enabled


def _limiter() -> RateLimiter:
    # Building a client and registering scripts opens no socket.
    return RateLimiter(redis.Redis(host="127.0.0.1", port=1), key_prefix="gw")


def test_keys_share_the_tenant_hash_tag() -> None:
    """Tenant and model keys carry the same {tenant} tag, so one call stays in one slot."""
    limiter = _limiter()
    assert limiter.keys_for("acme") == {
        "requests": "gw:{acme}:rpm",
        "tokens": "gw:{acme}:tpm",
        "concurrency": "gw:{acme}:conc",
    }
    assert limiter.keys_for("acme", "gpt-4o")["requests"] == "gw:{acme}:m:gpt-4o:rpm"
    assert limiter.keys_for("acme", "meta/llama3:8b")["tokens"].startswith("gw:{acme}:m:")


@pytest.mark.parametrize("tenant", ["a}b", "{x}", "x" * 65, "with space", "ünïcode", ""])
def test_odd_tenants_are_hashed_into_a_safe_tag(tenant: str) -> None:
    """Braces, long or odd names become a bounded digest that cannot break the hash tag."""
    key = _limiter().keys_for(tenant)["requests"]
    tag = key[key.index("{") + 1 : key.index("}")]
    assert tag.startswith("~") and len(tag) == 33
    assert key == f"gw:{{{tag}}}:rpm"


def test_odd_models_are_hashed_and_distinct() -> None:
    """Different odd model names never share a key."""
    limiter = _limiter()
    a = limiter.keys_for("t", "m" * 200)["requests"]
    b = limiter.keys_for("t", "m" * 201)["requests"]
    assert a != b and len(a) < 80 and "{t}" in a


def test_bad_prefix_rejected() -> None:
    """A prefix with a brace would move the hash tag, so it is refused."""
    with pytest.raises(ValueError):
        RateLimiter(redis.Redis(host="127.0.0.1", port=1), key_prefix="g{w")
