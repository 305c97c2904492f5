"""The L2 verification rule, on small hand-written pairs."""

from __future__ import annotations

import time

import pytest

from app.cache.verify import DEFAULT_SEMANTIC_THRESHOLD, Verdict, is_semantic_hit, verify

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
