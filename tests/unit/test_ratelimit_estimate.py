"""The token estimate admission reserves before a request's usage is known."""

from __future__ import annotations

import pytest

from app.ratelimit.admission import DEFAULT_COMPLETION_ESTIMATE, estimate_tokens


@pytest.mark.parametrize(
    "max_tokens",
    [None, 0, -5, True, False, 1.5, 1e16, float("nan"), float("inf"), "1.5", "100", [100]],
    ids=repr,
)
def test_max_tokens_other_than_a_positive_integer_counts_as_absent(max_tokens: object) -> None:
    """Anything but a positive int max_tokens falls back to the default completion estimate, never an error."""
    assert estimate_tokens(400, max_tokens) == 100 + DEFAULT_COMPLETION_ESTIMATE


def test_max_tokens_is_added_to_the_prompt_estimate() -> None:
    """A positive integer max_tokens (however large) is the completion part; the limiter clamps it."""
    assert estimate_tokens(400, 50) == 150
    assert estimate_tokens(0, 2**63) == 2**63
    assert estimate_tokens(-8, None) == DEFAULT_COMPLETION_ESTIMATE
