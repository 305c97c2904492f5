"""L2, the semantic cache, through real gunicorn processes with the local model (and the remote API client).

Every test puts its `unique` word in the system prompt, so its L2 partition is its own on the shared Redis.
Paraphrases are clear ones the verifier accepts at the default threshold ("How do I" / "How can I"). An answer's L2
entry is written after the answer has gone and other workers sync every 0.5 s: tests give it STORED seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from app.cache.lexicon import verifier_model
from tests.support import Gateway, MockUpstream, base_env, free_port, gateway_pair

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

QUESTION = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"
ANSWER = f"Mock answer to: {QUESTION}"
STORED = 1.0  # the acceptance bound: a stored entry is findable by a paraphrase this long after its answer


@pytest.fixture(scope="module")
def semantic_gateways(upstream_server: MockUpstream) -> Iterator[tuple[Gateway, Gateway]]:
    """Two gateway processes with L2 on (local model), sharing Redis."""
    env = base_env(upstream_server, SEMANTIC_CACHE_ENABLED="true", UPSTREAM_MAX_RETRIES="0")
    with gateway_pair(env) as pair:
        yield pair


@pytest.fixture
def gw(semantic_gateways: tuple[Gateway, Gateway]) -> Gateway:
    return semantic_gateways[0]


def chat(unique: str, question: str, *, system: str = "You answer support questions for {unique}.",
         before: list[dict[str, str]] | None = None, **fields: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": system.format(unique=unique)}, *(before or []),
                {"role": "user", "content": question}]
    return {"model": "mock-gpt", "temperature": 0, "messages": messages, **fields}


def post(gw: Gateway, body: dict[str, Any]) -> requests.Response:
    response = requests.post(gw.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response


def cache_of(response: requests.Response) -> str:
    layer = response.headers.get("X-Cache-Layer")
    return f"{response.headers['X-Cache']}/{layer}" if layer else response.headers["X-Cache"]


def chat_calls(upstream: MockUpstream) -> int:
    return sum(1 for r in upstream.requests() if r["path"].endswith("/chat/completions"))


def similarity(response: requests.Response) -> float:
    return float(response.headers["X-Cache-Similarity"])


def counter(gw: Gateway, name: str, **labels: str) -> float:
    """A counter's value summed over the workers (0 when it has no sample yet)."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for row in requests.get(gw.metrics_url, timeout=10).text.splitlines():
        if row.startswith(name + "{") and all(w in row for w in wanted):
            total += float(row.rsplit(" ", 1)[1])
    return total


def test_paraphrase_is_an_l2_hit_within_a_second(gw: Gateway, upstream: MockUpstream, unique: str) -> None:
    """A paraphrase of a cached question gets its answer from L2 a second later, with the similarity in a header."""
    assert cache_of(post(gw, chat(unique, QUESTION))) == "MISS"
    time.sleep(STORED)
    hit = post(gw, chat(unique, PARAPHRASE))
    assert cache_of(hit) == "HIT/L2"
    assert verifier_model().default_threshold <= similarity(hit) < 1.0
    assert hit.json()["choices"][0]["message"]["content"] == ANSWER
    assert chat_calls(upstream) == 1


@pytest.mark.parametrize("change", [
    {"system": "You answer billing questions for {unique}."},
    {"model": "gpt-4o-mini"},
    {"temperature": 0.2},
    {"before": [{"role": "user", "content": "I use the mobile app."}, {"role": "assistant", "content": "Noted."}]},
], ids=["system-prompt", "model", "temperature", "earlier-turn"])
def test_paraphrase_in_another_context_misses(gw: Gateway, upstream: MockUpstream, unique: str,
                                              change: dict[str, Any]) -> None:
    """The same paraphrase with another system prompt, model, temperature or history is not served from L2."""
    assert cache_of(post(gw, chat(unique, QUESTION))) == "MISS"
    time.sleep(STORED)
    other = post(gw, chat(unique, PARAPHRASE, **change))
    assert cache_of(other) == "MISS"
    assert "X-Cache-Similarity" not in other.headers
    assert chat_calls(upstream) == 2


def test_entity_swap_misses(gw: Gateway, upstream: MockUpstream, unique: str) -> None:
    """"... in Atlanta?" never answers "... in Toronto?"."""
    atlanta = post(gw, chat(unique, "What is the weather like in Atlanta?"))
    time.sleep(STORED)
    toronto = post(gw, chat(unique, "What is the weather like in Toronto?"))
    assert (cache_of(atlanta), cache_of(toronto)) == ("MISS", "MISS")
    assert toronto.json()["choices"][0]["message"]["content"] == "Mock answer to: What is the weather like in Toronto?"
    assert chat_calls(upstream) == 2


def test_a_new_prompt_in_an_empty_partition_runs_no_transformer(gw: Gateway, upstream: MockUpstream,
                                                                unique: str) -> None:
    """New prompts with no near neighbour cost no model run: only a table look-up, and nothing in an empty partition."""
    before = counter(gw, "gateway_embeddings_total", stage="transformer")
    request_id = f"empty-{unique}"
    response = requests.post(gw.url + "/v1/chat/completions", json=chat(unique, QUESTION),
                             headers={"X-Request-ID": request_id}, timeout=60)
    assert cache_of(response) == "MISS"
    time.sleep(STORED)
    for i, prompt in enumerate(["Write a haiku about autumn leaves.", "What is the boiling point of ethanol?",
                                "Translate 'good night' into German."]):
        assert cache_of(post(gw, chat(unique, prompt))) == "MISS", i
    assert counter(gw, "gateway_embeddings_total", stage="transformer") == before
    assert counter(gw, "gateway_semantic_skipped_total", reason="empty_partition") >= 1
    time.sleep(0.2)
    (line,) = [row for row in gw.request_lines() if row.get("request_id") == request_id]
    assert line["semantic"] == "empty_partition"


def test_min_similarity_header_only_tightens(gw: Gateway, upstream: MockUpstream, unique: str) -> None:
    """X-Cache-Min-Similarity raises the bar for one request; a value below the default changes nothing."""
    assert cache_of(post(gw, chat(unique, QUESTION))) == "MISS"
    time.sleep(STORED)
    strict = requests.post(gw.url + "/v1/chat/completions", json=chat(unique, PARAPHRASE),
                           headers={"X-Cache-Min-Similarity": "0.9999"}, timeout=60)
    assert cache_of(strict) == "MISS"
    loose = requests.post(gw.url + "/v1/chat/completions", json=chat(unique, "How could I reset my password?"),
                          headers={"X-Cache-Min-Similarity": "0.1"}, timeout=60)
    assert cache_of(loose) == "HIT/L2" and similarity(loose) >= verifier_model().default_threshold
    bad = requests.post(gw.url + "/v1/chat/completions", json=chat(unique, PARAPHRASE),
                        headers={"X-Cache-Min-Similarity": "high"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_min_similarity"


def test_refusals_are_counted_by_rule_and_logged(gw: Gateway, upstream: MockUpstream, unique: str) -> None:
    """A look-alike refused by a rule shows in the rule's counter and in the log line's reason."""
    before = counter(gw, "gateway_semantic_decisions_total", outcome="number")
    assert cache_of(post(gw, chat(unique, "How do I install Python 3.11 on Ubuntu?"))) == "MISS"
    time.sleep(STORED)
    request_id = f"refused-{unique}"
    response = requests.post(gw.url + "/v1/chat/completions",
                             json=chat(unique, "How do I install Python 3.12 on Ubuntu?"),
                             headers={"X-Request-ID": request_id}, timeout=60)
    assert cache_of(response) == "MISS"
    assert counter(gw, "gateway_semantic_decisions_total", outcome="number") == before + 1
    time.sleep(0.2)
    (line,) = [row for row in gw.request_lines() if row.get("request_id") == request_id]
    assert line["semantic"].startswith("numbers differ")


def test_no_l2_above_the_max_temperature(gw: Gateway, upstream: MockUpstream, unique: str) -> None:
    """Above SEMANTIC_MAX_TEMPERATURE (0.7) a paraphrase misses; the identical request still hits exactly."""
    assert cache_of(post(gw, chat(unique, QUESTION, temperature=0.9))) == "MISS"
    assert cache_of(post(gw, chat(unique, PARAPHRASE, temperature=0.9))) == "MISS"
    assert cache_of(post(gw, chat(unique, QUESTION, temperature=0.9))) == "HIT/L0"
    assert chat_calls(upstream) == 2


def test_no_l2_without_temperature(gw: Gateway, upstream: MockUpstream, unique: str) -> None:
    """No temperature means the API's default (1.0): sampled answers are not shared between paraphrases."""
    body = chat(unique, QUESTION)
    del body["temperature"]
    paraphrase = {**body, "messages": [*body["messages"][:-1], {"role": "user", "content": PARAPHRASE}]}
    assert cache_of(post(gw, body)) == "MISS"
    assert cache_of(post(gw, paraphrase)) == "MISS"


def test_no_l2_for_several_choices(gw: Gateway, upstream: MockUpstream, unique: str) -> None:
    """`n: 2` asks for distinct samples: a paraphrase is not answered from L2."""
    first = post(gw, chat(unique, QUESTION, n=2))
    assert cache_of(first) == "MISS" and len(first.json()["choices"]) == 2
    assert cache_of(post(gw, chat(unique, PARAPHRASE, n=2))) == "MISS"
    assert chat_calls(upstream) == 2


def test_entry_written_by_one_process_is_found_by_another(semantic_gateways: tuple[Gateway, Gateway],
                                                          upstream: MockUpstream, unique: str) -> None:
    """An L2 entry stored by one gateway process is a semantic hit in another within a second."""
    first, second = semantic_gateways
    # The second process already holds this partition's index, so it must sync to see the new entry.
    assert cache_of(post(second, chat(unique, "How do I delete my account?"))) == "MISS"
    assert cache_of(post(first, chat(unique, QUESTION))) == "MISS"
    time.sleep(1.0)
    hit = post(second, chat(unique, PARAPHRASE))
    assert cache_of(hit) == "HIT/L2"
    assert hit.json()["choices"][0]["message"]["content"] == ANSWER
    assert chat_calls(upstream) == 2


@pytest.fixture(scope="module")
def remote_gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    """L2 with the OpenAI-compatible embedding client, pointed at the mock upstream."""
    gw = Gateway(base_env(upstream_server, SEMANTIC_CACHE_ENABLED="true", EMBEDDING_PROVIDER="openai",
                          EMBEDDING_URL=upstream_server.url, EMBEDDING_MODEL="text-embedding-3-small",
                          EMBEDDING_API_KEY="sk-embedding-test"))
    yield gw
    gw.stop()


def test_remote_embeddings_serve_l2(remote_gateway: Gateway, upstream: MockUpstream, unique: str) -> None:
    """With EMBEDDING_PROVIDER=openai the last user turn is embedded by the API and L2 hits work."""
    assert cache_of(post(remote_gateway, chat(unique, QUESTION))) == "MISS"
    time.sleep(STORED)
    # Another exact key (case, punctuation), the same words: the mock's word-hash vectors are equal.
    hit = post(remote_gateway, chat(unique, "how do i reset my password"))
    assert cache_of(hit) == "HIT/L2"
    assert similarity(hit) >= 0.99
    assert hit.json()["choices"][0]["message"]["content"] == ANSWER
    embedded = [r for r in upstream.requests() if r["path"].endswith("/embeddings")]
    assert embedded and all(r["body"]["model"] == "text-embedding-3-small" for r in embedded)
    assert embedded[0]["headers"]["authorization"] == "Bearer sk-embedding-test"
    # The new prompt, then the stored candidate (whose vector was not needed until now).
    assert [r["body"]["input"] for r in embedded] == [["how do i reset my password"], [QUESTION]]
    assert chat_calls(upstream) == 1
    # The candidate's vector was kept: a third phrasing embeds only itself.
    time.sleep(STORED)
    assert cache_of(post(remote_gateway, chat(unique, "How do I reset my password"))) == "HIT/L2"
    embedded = [r for r in upstream.requests() if r["path"].endswith("/embeddings")]
    assert embedded[-1]["body"]["input"] == ["How do I reset my password"]


@pytest.fixture(scope="module")
def broken_embedding_gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    """L2 on, but the embedding API is a closed port."""
    gw = Gateway(base_env(upstream_server, SEMANTIC_CACHE_ENABLED="true", EMBEDDING_PROVIDER="openai",
                          EMBEDDING_URL=f"http://127.0.0.1:{free_port()}", EMBEDDING_MODEL="text-embedding-3-small"))
    yield gw
    gw.stop()


def test_embedding_failure_still_serves_the_request(broken_embedding_gateway: Gateway, upstream: MockUpstream,
                                                    unique: str) -> None:
    """An unreachable embedding API costs L2 only: 200 MISS, then exact hits; the error is logged and counted."""
    gw = broken_embedding_gateway
    assert cache_of(post(gw, chat(unique, PARAPHRASE))) == "MISS"  # stored with its static vector: no API call
    time.sleep(STORED)
    request_id = f"l2-down-{unique}"
    started = time.monotonic()
    response = requests.post(gw.url + "/v1/chat/completions", json=chat(unique, QUESTION),
                             headers={"X-Request-ID": request_id}, timeout=30)
    assert time.monotonic() - started < 5
    assert response.status_code == 200
    assert cache_of(response) == "MISS"
    assert response.json()["choices"][0]["message"]["content"] == ANSWER
    assert cache_of(post(gw, chat(unique, QUESTION))) == "HIT/L0"
    time.sleep(0.2)  # the log line is written when the response closes
    (line,) = [line for line in gw.request_lines() if line.get("request_id") == request_id]
    assert line["status"] == 200 and line["cache"] == "MISS"
    assert any("embedding failed" in str(entry.get("message")) for entry in gw.log_lines())
    metrics = requests.get(gw.metrics_url, timeout=10).text
    errors = [row for row in metrics.splitlines()
              if row.startswith("gateway_cache_lookups_total{") and 'layer="L2"' in row and 'result="error"' in row]
    assert errors and float(errors[0].rsplit(" ", 1)[1]) >= 1


def test_failed_embedding_is_not_tried_again_to_store(remote_gateway: Gateway, upstream: MockUpstream,
                                                      unique: str) -> None:
    """An embedding API refusing every call is asked once per request: the store does not wait on it again."""
    assert cache_of(post(remote_gateway, chat(unique, PARAPHRASE))) == "MISS"
    time.sleep(STORED)
    upstream.reset()
    upstream.faults({"status": 400, "times": -1, "paths": ["/v1/embeddings"]})  # a 400 is never retried
    response = post(remote_gateway, chat(unique, QUESTION))
    assert cache_of(response) == "MISS"
    assert cache_of(post(remote_gateway, chat(unique, QUESTION))) == "HIT/L0"
    assert sum(1 for r in upstream.requests() if r["path"].endswith("/embeddings")) == 1
