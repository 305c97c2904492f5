"""The L2 decision on a sample of the labelled dev pairs: a higher threshold never serves more, and 0.99 is strict."""

from __future__ import annotations

import pytest

from tests.semantic_pairs import sample
from tools.eval_semantic import served

pytestmark = pytest.mark.slow

THRESHOLDS = [round(0.5 + 0.01 * i, 2) for i in range(50)]


def test_false_hits_never_rise_with_the_threshold_and_are_rare_at_099() -> None:
    """Sweeping SEMANTIC_CACHE_THRESHOLD upwards, no pair that must not be served starts being served."""
    first_served = 0
    for dataset in ("prompts", "quora"):
        negatives = [p for p in sample() if p.dataset == dataset and p.label == 0]
        assert len(negatives) > 60
        served_at = {t: {id(p) for p in negatives if served(p, t)} for t in THRESHOLDS}
        for lower, higher in zip(THRESHOLDS, THRESHOLDS[1:], strict=False):
            assert served_at[higher] <= served_at[lower], (dataset, lower, higher)
        strict = len(served_at[0.99]) / len(negatives)
        assert strict <= 0.02, f"{dataset}: {strict:.1%} false hits at 0.99"
        first_served += len(served_at[THRESHOLDS[0]])
    assert first_served, "the sweep starts where some look-alike is served, or it proves nothing"


def test_paraphrases_are_served_at_the_default() -> None:
    """The strictness is not bought by serving nothing: most sampled paraphrases are served at the default."""
    from app.cache.lexicon import verifier_model

    default = verifier_model().default_threshold
    for dataset, least in (("prompts", 0.6), ("quora", 0.4)):
        positives = [p for p in sample() if p.dataset == dataset and p.label == 1]
        share = sum(served(p, default) for p in positives) / len(positives)
        assert share >= least, f"{dataset}: {share:.0%} of paraphrases served"
