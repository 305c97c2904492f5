"""The L2 verification rule, on small hand-written pairs."""

from __future__ import annotations

import time

import pytest

from app.cache.verify import (
    DEFAULT_SEMANTIC_THRESHOLD,
    MARGIN_WEIGHTS,
    SEARCH_SLACK,
    Verdict,
    candidate_floor,
    features,
    is_semantic_hit,
    margin_of,
    verify,
)

REJECT = [
    ("What is the best pizza place in Atlanta?", "What is the best pizza place in Toronto?"),
    ("How do I install Python 3.11 on Ubuntu?", "How do I install Python 3.12 on Ubuntu?"),
    ("What was the population of the city in 1990?", "What was the population of the city in 2010?"),
    ("Is coffee good for your health?", "Is coffee not good for your health?"),
    ("Why can't I sleep at night?", "Why can I sleep at night?"),
    ("How do I convert Celsius to Fahrenheit?", "How do I convert Fahrenheit to Celsius?"),
    ("How to translate from English to Spanish?", "How to translate from Spanish to English?"),
    ("Is Rust faster than Go?", "Is Go faster than Rust?"),
    ("How do I configure AWS Lambda timeouts?", "How do I configure GCP Lambda timeouts?"),
    ("What are two ways to cook rice?", "What are five ways to cook rice?"),
]

ACCEPT = [
    ("How can I learn Python quickly?", "What is the fastest way to learn Python?"),
    ("What is the capital of France?", "what's the capital of france"),
    ("How do I reset my password?", "How can I reset my password?"),
    ("Why is the sky blue?", "Why is the sky blue in colour?"),
    ("How do I convert Celsius to Fahrenheit?", "How can I convert Celsius into Fahrenheit?"),
    ("Why or why not should I learn Java?", "Should I learn Java?"),
]


@pytest.mark.parametrize(("query", "candidate"), REJECT)
def test_rejects_near_misses(query: str, candidate: str) -> None:
    """Entity, number, negation and direction changes are rejected, in both argument orders, with a reason."""
    for a, b in ((query, candidate), (candidate, query)):
        verdict = verify(a, b)
        assert not verdict, verdict
        assert verdict.reason


@pytest.mark.parametrize(("query", "candidate"), ACCEPT)
def test_accepts_paraphrases(query: str, candidate: str) -> None:
    """Rephrasings that keep entities, numbers, negation and direction pass the lexical checks."""
    assert verify(query, candidate), verify(query, candidate)
    assert verify(candidate, query)


def test_reasons_name_what_differs() -> None:
    """The reason says which kind of difference was found."""
    assert "numbers" in verify("Python 3.11 release date", "Python 3.12 release date").reason
    assert "entity" in verify("Flights to Paris from Berlin", "Flights to Paris from Madrid").reason
    assert "negation" in verify("Is it safe?", "Is it not safe?").reason
    assert "direction" in verify("convert pounds to kilograms", "convert kilograms to pounds").reason


def test_is_semantic_hit_applies_threshold_and_margin() -> None:
    """Below the threshold is a miss; a differing content word needs extra similarity."""
    same = ("How do I reset my password?", "How can I reset my password?")
    assert is_semantic_hit(0.99, *same)
    assert not is_semantic_hit(DEFAULT_SEMANTIC_THRESHOLD - 0.01, *same)
    extra = ("What are small business ideas?", "What are small business ideas for teens?")
    verdict = verify(*extra)
    assert verdict.ok and verdict.margin > 0
    assert not is_semantic_hit(DEFAULT_SEMANTIC_THRESHOLD, *extra)
    assert is_semantic_hit(DEFAULT_SEMANTIC_THRESHOLD + verdict.margin, *extra)


def test_deterministic_and_fast() -> None:
    """Same answer every time, and well under a millisecond per call once warm."""
    pair = ("How do I convert Celsius to Fahrenheit in Excel 2016?", "How can I convert Fahrenheit to Celsius?")
    first = verify(*pair)
    assert isinstance(first, Verdict)
    started = time.perf_counter()
    for i in range(200):
        assert verify(pair[0] + " " * (i % 7), pair[1]) == first
    assert (time.perf_counter() - started) / 200 < 0.002


def test_same_content_words_need_exactly_the_threshold() -> None:
    """The learned margin is 0 when only phrasing differs, so the threshold keeps its meaning for such pairs."""
    verdict = verify("How do I reset my password?", "How can I reset my password?")
    assert verdict.ok and verdict.margin == 0.0
    assert "same content words" in verdict.reason


def test_rare_or_name_like_difference_costs_more_than_a_common_one() -> None:
    """A rare word or a name on one side only raises the similarity needed more than a common word does."""
    common = verify("What are good business ideas?", "What are good business ideas for students?")
    rare = verify("What are good business ideas?", "What are good business ideas for dentists?")
    name = verify("What is the weather like?", "What is the weather like in Toronto?")
    assert common.ok and rare.ok and name.ok  # priced, not rejected: one side only, nothing was replaced
    assert 0 < common.margin < rare.margin
    assert name.margin > common.margin and "Toronto" in name.reason


def test_rewording_over_several_words_needs_less() -> None:
    """Differences spread over several ordinary words (a rephrasing) lower the similarity needed."""
    verdict = verify("How do I learn to play guitar?", "How can I teach myself guitar?")
    assert verdict.ok and verdict.margin < 0
    assert "words differ" in verdict.reason
    needed = DEFAULT_SEMANTIC_THRESHOLD + verdict.margin
    assert is_semantic_hit(needed + 0.001, "How do I learn to play guitar?", "How can I teach myself guitar?")


def test_floor_bounds_any_negative_margin() -> None:
    """Nothing below ``threshold - SEARCH_SLACK`` is served, whatever the margin; the index searches from there."""
    pair = ("How do I learn to play guitar?", "How can I teach myself guitar?")
    assert candidate_floor(0.9) == pytest.approx(0.9 - SEARCH_SLACK)
    verdict = is_semantic_hit(candidate_floor(DEFAULT_SEMANTIC_THRESHOLD) - 0.001, *pair)
    assert not verdict and "similarity" in verdict.reason


def test_features_and_margin_agree_with_the_verdict() -> None:
    """:func:`features` exposes what the margin weighs (None when a hard rule rejects): the tuning tool uses it."""
    assert features("Is Rust faster than Go?", "Is Go faster than Rust?") is None
    values = features("What are good business ideas?", "What are good business ideas for students?")
    assert values is not None and set(values) == set(MARGIN_WEIGHTS)
    assert values["words_differ"] == 1.0 and values["one_side_name"] == 0.0
    verdict = verify("What are good business ideas?", "What are good business ideas for students?")
    assert verdict.margin == pytest.approx(margin_of(values), abs=1e-4)
