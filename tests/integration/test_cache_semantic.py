"""L2, the semantic cache, through real gunicorn processes with the local model (and the remote API client).

Every test puts its `unique` word in the system prompt, so its L2 partition is its own on the shared Redis.
Paraphrases are clear ones the verifier accepts at the default threshold ("How do I" / "How can I").
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from app.config import DEFAULT_SEMANTIC_THRESHOLD
from tests.support import Gateway, MockUpstream, base_env, free_port, gateway_pair

QUESTION = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"
ANSWER = f"Mock answer to: {QUESTION}"


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


def test_paraphrase_is_an_l2_hit(gw: Gateway, upstream: MockUpstream, unique: str) -> None:
    """A paraphrase of a cached question gets its answer from L2, with the similarity in a header."""
    assert cache_of(post(gw, chat(unique, QUESTION))) == "MISS"
    hit = post(gw, chat(unique, PARAPHRASE))
    assert cache_of(hit) == "HIT/L2"
    assert DEFAULT_SEMANTIC_THRESHOLD <= similarity(hit) < 1.0
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
    other = post(gw, chat(unique, PARAPHRASE, **change))
    assert cache_of(other) == "MISS"
    assert "X-Cache-Similarity" not in other.headers
    assert chat_calls(upstream) == 2


def test_entity_swap_misses(gw: Gateway, upstream: MockUpstream, unique: str) -> None:
    """"... in Atlanta?" never answers "... in Toronto?"."""
    atlanta = post(gw, chat(unique, "What is the weather like in Atlanta?"))
    toronto = post(gw, chat(unique, "What is the weather like in Toronto?"))
    assert (cache_of(atlanta), cache_of(toronto)) == ("MISS", "MISS")
    assert toronto.json()["choices"][0]["message"]["content"] == "Mock answer to: What is the weather like in Toronto?"
    assert chat_calls(upstream) == 2


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
    # Another exact key (case, punctuation), the same words: the mock's word-hash vectors are equal.
    hit = post(remote_gateway, chat(unique, "how do i reset my password"))
    assert cache_of(hit) == "HIT/L2"
    assert similarity(hit) >= 0.99
    assert hit.json()["choices"][0]["message"]["content"] == ANSWER
    embedded = [r for r in upstream.requests() if r["path"].endswith("/embeddings")]
    assert embedded and all(r["body"]["model"] == "text-embedding-3-small" for r in embedded)
    assert embedded[0]["headers"]["authorization"] == "Bearer sk-embedding-test"
    assert {tuple(r["body"]["input"]) for r in embedded} == {(QUESTION,), ("how do i reset my password",)}
    assert chat_calls(upstream) == 1


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
    metrics = requests.get(gw.url + "/metrics", timeout=10).text
    errors = [row for row in metrics.splitlines()
              if row.startswith("gateway_cache_lookups_total{") and 'layer="L2"' in row and 'result="error"' in row]
    assert errors and float(errors[0].rsplit(" ", 1)[1]) >= 1


def test_failed_embedding_is_not_tried_again_to_store(remote_gateway: Gateway, upstream: MockUpstream,
                                                      unique: str) -> None:
    """An embedding API refusing every call is asked once per request: the store does not wait on it again."""
    upstream.faults({"status": 400, "times": -1, "paths": ["/v1/embeddings"]})  # a 400 is never retried
    response = post(remote_gateway, chat(unique, QUESTION))
    assert cache_of(response) == "MISS"
    assert cache_of(post(remote_gateway, chat(unique, QUESTION))) == "HIT/L0"
    assert sum(1 for r in upstream.requests() if r["path"].endswith("/embeddings")) == 1
