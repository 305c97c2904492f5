"""Dev pairs replayed through a running gateway: it serves what `make eval` says it serves.

Each pair gets a partition of its own (its own system prompt): the stored side is asked first, then, once its L2
entry is written, the other side. The gateway's L2 hits are compared with tools/eval_semantic.py's decision for the
same pairs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests

from app.cache.lexicon import verifier_model
from tests.semantic_pairs import sample
from tests.support import Gateway, MockUpstream, base_env
from tools.eval_semantic import Pair, served

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, SEMANTIC_CACHE_ENABLED="true"), workers=2)
    yield gw
    gw.stop()


def ask(gw: Gateway, system: str, text: str) -> str:
    body = {"model": "mock-gpt", "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}]}
    response = requests.post(gw.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.headers.get("X-Cache-Layer") or response.headers["X-Cache"]


def rates(pairs: list[Pair], hits: list[bool]) -> tuple[float, float]:
    negatives = [h for p, h in zip(pairs, hits, strict=True) if p.label == 0]
    positives = [h for p, h in zip(pairs, hits, strict=True) if p.label == 1]
    return 100.0 * sum(negatives) / len(negatives), 100.0 * sum(positives) / len(positives)


def test_the_running_gateway_matches_the_evaluation(gateway: Gateway, upstream: MockUpstream, unique: str) -> None:
    """Same pairs, same decisions: false hits and useful hits within 2 points of the evaluation's."""
    pairs = [p for p in sample() if p.dataset == "prompts"][::2] + [p for p in sample() if p.dataset == "quora"][::2]
    systems = [f"Replay {unique} pair {i}." for i in range(len(pairs))]
    for system, pair in zip(systems, pairs, strict=True):
        assert ask(gateway, system, pair.b) == "MISS"
    time.sleep(1.2)  # L2 entries are written after the answer; workers sync every 0.5 s
    through = [ask(gateway, system, pair.a) == "L2" for system, pair in zip(systems, pairs, strict=True)]
    expected = [served(pair, verifier_model().default_threshold) for pair in pairs]
    for dataset in ("prompts", "quora"):
        chosen = [i for i, p in enumerate(pairs) if p.dataset == dataset]
        got = rates([pairs[i] for i in chosen], [through[i] for i in chosen])
        want = rates([pairs[i] for i in chosen], [expected[i] for i in chosen])
        assert abs(got[0] - want[0]) <= 2.0 and abs(got[1] - want[1]) <= 2.0, (dataset, got, want)
    assert sum(through) >= 20, "the sample must exercise hits, not only misses"
