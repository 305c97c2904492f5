"""The exact cache through real gunicorn processes: L0/L1 hits, what shares a key, Cache-Control, TTL, admin.

Two gateway processes share one private redis-server (a private one because `DELETE /admin/cache` bumps a
generation every gateway on that Redis sees); every test uses its own prompts.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from tests.support import Gateway, MockUpstream, RedisServer, base_env, gateway_pair

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

ADMIN_KEY = f"admin-{uuid.uuid4().hex}"
ALPHA_KEY = f"sk-alpha-{uuid.uuid4().hex}"
BETA_KEY = f"sk-beta-{uuid.uuid4().hex}"
CHAT_PATH = "/v1/chat/completions"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A redis-server of this module's own, on a free loopback port."""
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.kill()


@pytest.fixture(scope="module")
def gateways(upstream_server: MockUpstream, redis_url: str) -> Iterator[tuple[Gateway, Gateway]]:
    """Two gateway processes (one worker each) on the same Redis, with admin and two tenants."""
    env = base_env(upstream_server, REDIS_URL=redis_url, ADMIN_API_KEY=ADMIN_KEY, AUTH_DISABLED="false",
                   GATEWAY_API_KEYS=f"alpha:{ALPHA_KEY},beta:{BETA_KEY}", UPSTREAM_MAX_RETRIES="0")
    with gateway_pair(env) as pair:
        yield pair


@pytest.fixture
def gw(gateways: tuple[Gateway, Gateway]) -> Gateway:
    return gateways[0]


@pytest.fixture
def other(gateways: tuple[Gateway, Gateway]) -> Gateway:
    return gateways[1]


def chat(unique: str, text: str = "Tell me about", **fields: Any) -> dict[str, Any]:
    return {"model": "mock-gpt", "messages": [{"role": "user", "content": f"{text} {unique}"}], **fields}


def post(gw: Gateway, body: Any, *, path: str = CHAT_PATH, key: str = ALPHA_KEY,
         headers: dict[str, str] | None = None) -> requests.Response:
    all_headers = {"Authorization": f"Bearer {key}", **(headers or {})}
    if isinstance(body, str | bytes):
        all_headers["Content-Type"] = "application/json"
        return requests.post(gw.url + path, data=body, headers=all_headers, timeout=30)
    return requests.post(gw.url + path, json=body, headers=all_headers, timeout=30)


def admin(gw: Gateway, method: str, path: str, key: str | None = ADMIN_KEY) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.request(method, gw.url + path, headers=headers, timeout=10)


def cache_of(response: requests.Response) -> str:
    """HIT/L0, HIT/L1, MISS, BYPASS: what the client sees of the cache."""
    assert response.status_code == 200, response.text
    layer = response.headers.get("X-Cache-Layer")
    return f"{response.headers['X-Cache']}/{layer}" if layer else response.headers["X-Cache"]


def content(response: requests.Response) -> str:
    return response.json()["choices"][0]["message"]["content"]


def sse_chunks(response: requests.Response) -> list[dict[str, Any]]:
    assert response.headers["Content-Type"].startswith("text/event-stream")
    chunks = []
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunks.append(json.loads(line[6:]))
    assert response.text.rstrip().endswith("data: [DONE]")
    return chunks


def seconds_until(check: Callable[[], bool], limit: float = 3.0) -> float:
    """How long until `check()` is true, polling; fails the test past `limit`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < limit, "condition never became true"
        time.sleep(0.02)
    return time.monotonic() - started


def test_repeat_is_an_l0_hit_in_the_same_worker(gw: Gateway, upstream: MockUpstream, unique: str) -> None:
    """The second identical request is answered from the worker's memory, without the upstream."""
    first = post(gw, chat(unique))
    second = post(gw, chat(unique))
    assert cache_of(first) == "MISS"
    assert cache_of(second) == "HIT/L0"
    assert second.json() == first.json()
    assert len(upstream.requests()) == 1


def stored(gw: Gateway) -> float:
    """Seconds until this gateway's stored answers have left for Redis. A store's SET is sent after its answer
    (app/cache/write_behind.py): the answer is not held for it, and another process finds the entry a few milliseconds
    later, not before. (Each gateway of this module has one worker, so its stats are the whole process's.)"""
    return seconds_until(lambda: admin(gw, "GET", "/admin/cache/stats").json()["writes"]["pending"] == 0,
                         limit=0.5)


def test_another_process_gets_an_l1_hit(gw: Gateway, other: Gateway, upstream: MockUpstream, unique: str) -> None:
    """An answer stored by one gateway process is an L1 (Redis) hit in another, then L0 there.

    The SET is not waited for by the answer (app/cache/write_behind.py): it reaches Redis within milliseconds."""
    first = post(gw, chat(unique))
    stored(gw)
    from_redis = post(other, chat(unique))
    from_memory = post(other, chat(unique))
    assert cache_of(first) == "MISS"
    assert cache_of(from_redis) == "HIT/L1"
    assert cache_of(from_memory) == "HIT/L0"
    assert content(from_redis) == content(first) == f"Mock answer to: Tell me about {unique}"
    assert len(upstream.requests()) == 1


@pytest.mark.parametrize("garbage", [b"not a cache entry", b"%.3f\n[1, 2]" % (time.time() + 600)],
                         ids=["not-an-entry", "json-not-an-object"])
def test_an_unreadable_entry_is_a_miss_not_an_outage(gw: Gateway, other: Gateway, upstream: MockUpstream,
                                                      redis_url: str, unique: str, garbage: bytes) -> None:
    """An entry that is not what the gateway wrote (another tool, a bad restore) costs a miss, nothing more:
    the answer comes from the upstream, is stored again, and the cache stays on for everyone."""
    import redis

    assert cache_of(post(gw, chat(unique))) == "MISS"
    stored(gw)
    client = redis.Redis.from_url(redis_url)
    entries = [key for key in client.scan_iter("gw:c:*") if client.type(key) == b"string"]
    for key in entries:
        client.set(key, garbage, keepttl=True)
    assert entries
    fresh = post(other, chat(unique))
    assert cache_of(fresh) == "MISS"
    assert content(fresh) == f"Mock answer to: Tell me about {unique}"
    assert cache_of(post(other, chat(unique))) == "HIT/L0"
    assert len(upstream.requests()) == 2


def test_streamed_miss_is_a_hit_for_the_plain_request(gw: Gateway, other: Gateway, upstream: MockUpstream,
                                                      unique: str) -> None:
    """A streamed answer, once complete, serves the same request without `stream` (here and elsewhere)."""
    streamed = post(gw, chat(unique, stream=True))
    assert cache_of(streamed) == "MISS"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in sse_chunks(streamed) if c["choices"])
    plain = post(gw, chat(unique))
    assert cache_of(plain) == "HIT/L0"
    assert content(plain) == text == f"Mock answer to: Tell me about {unique}"
    stored(gw)
    assert cache_of(post(other, chat(unique))) == "HIT/L1"
    assert len(upstream.requests()) == 1


def test_plain_miss_is_replayed_to_a_streamed_request(gw: Gateway, upstream: MockUpstream, unique: str) -> None:
    """A plain answer in the cache is replayed as an SSE stream to the same request with `stream: true`."""
    plain = post(gw, chat(unique))
    streamed = post(gw, chat(unique, stream=True))
    assert cache_of(plain) == "MISS"
    assert cache_of(streamed) == "HIT/L0"
    chunks = sse_chunks(streamed)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == content(plain)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(upstream.requests()) == 1


def test_user_key_order_and_whitespace_do_not_change_the_key(gw: Gateway, upstream: MockUpstream,
                                                             unique: str) -> None:
    """`user`, the order of JSON fields and the JSON formatting still hit the same entry."""
    body = chat(unique, temperature=0)
    assert cache_of(post(gw, body)) == "MISS"
    assert cache_of(post(gw, {**body, "user": f"someone-{unique}"})) == "HIT/L0"
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=4)
    assert reordered.index('"temperature"') < reordered.index('"model"')
    assert cache_of(post(gw, "\n  " + reordered + "\n")) == "HIT/L0"
    assert len(upstream.requests()) == 1


@pytest.mark.parametrize("field, value", [
    ("temperature", 0.3),
    ("max_tokens", 500),
    ("seed", 42),
    ("tools", [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]),
])
def test_answer_changing_fields_are_a_new_entry(gw: Gateway, upstream: MockUpstream, unique: str, field: str,
                                                value: Any) -> None:
    """A request differing in a field that changes the answer goes to the upstream."""
    assert cache_of(post(gw, chat(unique))) == "MISS"
    assert cache_of(post(gw, chat(unique, **{field: value}))) == "MISS"
    assert cache_of(post(gw, chat(unique, **{field: value}))) == "HIT/L0"
    assert len(upstream.requests()) == 2


def test_embeddings_answers_are_cached(gw: Gateway, other: Gateway, upstream: MockUpstream, unique: str) -> None:
    """/v1/embeddings: the same input is answered from the cache, in this process and another."""
    body = {"model": "text-embedding-3-small", "input": [f"alpha {unique}", f"beta {unique}"]}
    first = post(gw, body, path="/v1/embeddings")
    again = post(gw, body, path="/v1/embeddings")
    stored(gw)
    elsewhere = post(other, body, path="/v1/embeddings")
    assert (cache_of(first), cache_of(again), cache_of(elsewhere)) == ("MISS", "HIT/L0", "HIT/L1")
    assert again.json()["data"] == elsewhere.json()["data"] == first.json()["data"]
    assert len(first.json()["data"]) == 2
    assert len(upstream.requests()) == 1
    assert cache_of(post(gw, {**body, "input": [f"gamma {unique}"]}, path="/v1/embeddings")) == "MISS"


def test_no_cache_goes_upstream_and_refreshes_the_entry(gw: Gateway, other: Gateway, upstream: MockUpstream,
                                                        unique: str) -> None:
    """`Cache-Control: no-cache` skips the look-up (MISS) and replaces the stored answer everywhere."""
    first = post(gw, chat(unique))
    refreshed = post(gw, chat(unique), headers={"Cache-Control": "no-cache"})
    assert cache_of(first) == "MISS"
    assert cache_of(refreshed) == "MISS"
    assert len(upstream.requests()) == 2
    assert refreshed.json()["id"] != first.json()["id"]
    stored(gw)
    here, there = post(gw, chat(unique)), post(other, chat(unique))
    assert (cache_of(here), cache_of(there)) == ("HIT/L0", "HIT/L1")
    assert here.json()["id"] == there.json()["id"] == refreshed.json()["id"]
    assert len(upstream.requests()) == 2


def test_no_store_bypasses_and_stores_nothing(gw: Gateway, upstream: MockUpstream, unique: str) -> None:
    """`Cache-Control: no-store` is a BYPASS: not answered from the cache, and nothing is kept."""
    bypassed = post(gw, chat(unique), headers={"Cache-Control": "no-store"})
    assert cache_of(bypassed) == "BYPASS"
    assert cache_of(post(gw, chat(unique))) == "MISS"
    assert cache_of(post(gw, chat(unique), headers={"Cache-Control": "no-store"})) == "BYPASS"
    assert len(upstream.requests()) == 3


def test_store_true_always_reaches_the_provider(gw: Gateway, upstream: MockUpstream, unique: str) -> None:
    """`store: true` asks the provider to keep the completion (its id can be fetched later): such a request is
    sent upstream every time, even when the same request without it is cached, and is not kept itself."""
    assert cache_of(post(gw, chat(unique))) == "MISS"
    kept = [post(gw, {**chat(unique), "store": True}) for _ in range(2)]
    assert [cache_of(r) for r in kept] == ["BYPASS", "BYPASS"]
    assert kept[0].json()["id"] != kept[1].json()["id"]
    assert cache_of(post(gw, {**chat(unique), "store": False})) == "HIT/L0"
    assert len(upstream.requests()) == 3


def test_x_cache_ttl_expires_the_entry_also_from_l0(gw: Gateway, upstream: MockUpstream, unique: str) -> None:
    """`X-Cache-TTL: 1`: a hit right away, gone from Redis and the worker's memory after 1.5 s."""
    assert cache_of(post(gw, chat(unique), headers={"X-Cache-TTL": "1"})) == "MISS"
    assert cache_of(post(gw, chat(unique))) == "HIT/L0"
    time.sleep(1.5)
    assert cache_of(post(gw, chat(unique))) == "MISS"
    assert len(upstream.requests()) == 2


@pytest.mark.parametrize("ttl", ["abc", "1.5", "0", "-3"])
def test_bad_x_cache_ttl_is_a_400(gw: Gateway, upstream: MockUpstream, unique: str, ttl: str) -> None:
    """A TTL that is not a positive whole number is an OpenAI-style 400, and nothing reaches the upstream."""
    response = post(gw, chat(unique), headers={"X-Cache-TTL": ttl})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "X-Cache-TTL" in error["message"] and isinstance(error["type"], str)
    assert upstream.requests() == []


@pytest.mark.parametrize("fault", [{"status": 500}, {"status": 503}, {"status": 400}],
                         ids=["500", "503", "400"])
def test_upstream_errors_are_not_stored(gw: Gateway, upstream: MockUpstream, unique: str,
                                        fault: dict[str, Any]) -> None:
    """An upstream error reaches the client and is not cached: the same request then goes upstream again."""
    upstream.faults(fault)
    failed = post(gw, chat(unique))
    assert failed.status_code == fault["status"]
    assert "error" in failed.json()
    retried = post(gw, chat(unique))
    assert cache_of(retried) == "MISS"
    assert content(retried) == f"Mock answer to: Tell me about {unique}"
    assert len(upstream.requests()) == 2


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_length_cut_answers_are_not_stored(gw: Gateway, upstream: MockUpstream, unique: str, stream: bool) -> None:
    """An answer cut by the token limit (finish_reason `length`) is served but never cached."""
    upstream.faults({"kind": "length"})
    cut = post(gw, chat(unique, "Please explain in several words the topic", stream=stream))
    assert cache_of(cut) == "MISS"
    if stream:
        assert [c["choices"][0]["finish_reason"] for c in sse_chunks(cut) if c["choices"]][-1] == "length"
    else:
        assert cut.json()["choices"][0]["finish_reason"] == "length"
    full = post(gw, chat(unique, "Please explain in several words the topic"))
    assert cache_of(full) == "MISS"
    assert full.json()["choices"][0]["finish_reason"] == "stop"
    assert len(upstream.requests()) == 2


# -- admin ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway_without_admin(upstream_server: MockUpstream) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server))
    yield gw
    gw.stop()


@pytest.mark.parametrize("method, path", [("DELETE", "/admin/cache"), ("GET", "/admin/cache/stats")])
def test_admin_is_404_without_admin_api_key(gateway_without_admin: Gateway, method: str, path: str) -> None:
    """Without ADMIN_API_KEY the admin endpoints do not exist, whatever key is shown."""
    for key in (None, ADMIN_KEY):
        response = admin(gateway_without_admin, method, path, key)
        assert response.status_code == 404
        assert "error" in response.json()


@pytest.mark.parametrize("method, path", [("DELETE", "/admin/cache"), ("GET", "/admin/cache/stats")])
def test_admin_refuses_a_wrong_or_missing_key(gw: Gateway, method: str, path: str, unique: str) -> None:
    """A wrong admin key (a client key included) or none is a 401 OpenAI-style error."""
    before = admin(gw, "GET", "/admin/cache/stats").json()["generations"]
    for key in (f"wrong-{unique}", ALPHA_KEY, None):
        response = admin(gw, method, path, key)
        assert response.status_code == 401
        assert isinstance(response.json()["error"]["message"], str)
    assert admin(gw, "GET", "/admin/cache/stats").json()["generations"] == before


def warm(gateways: tuple[Gateway, Gateway], body: dict[str, Any], key: str = ALPHA_KEY) -> None:
    """Put the answer in Redis and in both processes' L0."""
    first, second = gateways
    assert cache_of(post(first, body, key=key)) == "MISS"
    stored(first)
    assert cache_of(post(second, body, key=key)) == "HIT/L1"
    assert cache_of(post(first, body, key=key)) == "HIT/L0"
    assert cache_of(post(second, body, key=key)) == "HIT/L0"


def miss_within(gw: Gateway, body: dict[str, Any], key: str = ALPHA_KEY) -> float:
    """Seconds until the identical request is a MISS in this process."""
    return seconds_until(lambda: cache_of(post(gw, body, key=key)) == "MISS")


def test_delete_all_is_a_miss_in_every_process_within_a_second(gateways: tuple[Gateway, Gateway],
                                                               upstream: MockUpstream, unique: str) -> None:
    """`DELETE /admin/cache`: within 1 s the next identical request is a MISS in both gateway processes."""
    first, second = gateways
    body_a, body_b = chat(unique, "First question on"), chat(unique, "Second question on")
    warm(gateways, body_a)
    warm(gateways, body_b)
    response = admin(first, "DELETE", "/admin/cache")
    assert response.status_code == 200
    assert response.json() == {"cleared": "*"}
    assert miss_within(first, body_a) <= 1.0
    assert miss_within(second, body_b) <= 1.0


def test_delete_by_model_only_drops_that_model(gateways: tuple[Gateway, Gateway], upstream: MockUpstream,
                                               unique: str) -> None:
    """`?model=` makes that model's answers misses everywhere within 1 s; other models still hit."""
    first, second = gateways
    gone, kept = chat(unique, model=f"mock-{unique}"), chat(unique)
    gone_b = chat(unique, "Another question on", model=f"mock-{unique}")
    for body in (gone, gone_b, kept):
        warm(gateways, body)
    response = admin(second, "DELETE", f"/admin/cache?model=mock-{unique}")
    assert response.status_code == 200
    assert miss_within(first, gone) <= 1.0
    assert miss_within(second, gone_b) <= 1.0
    # A deletion empties each worker's whole L0 (it cannot tell entries apart): other entries come from L1.
    assert post(first, kept).headers["X-Cache"] == "HIT"
    assert post(second, kept).headers["X-Cache"] == "HIT"


def test_delete_by_tenant_only_drops_that_tenant(gateways: tuple[Gateway, Gateway], upstream: MockUpstream,
                                                 unique: str) -> None:
    """`?tenant=` makes that tenant's answers misses everywhere within 1 s; another tenant's still hit."""
    first, second = gateways
    body, body_b = chat(unique), chat(unique, "Another question on")
    warm(gateways, body, BETA_KEY)
    warm(gateways, body_b, BETA_KEY)
    warm(gateways, body, ALPHA_KEY)
    response = admin(first, "DELETE", "/admin/cache?tenant=beta")
    assert response.status_code == 200
    assert miss_within(first, body, BETA_KEY) <= 1.0
    assert miss_within(second, body_b, BETA_KEY) <= 1.0
    assert post(first, body, key=ALPHA_KEY).headers["X-Cache"] == "HIT"
    assert post(second, body, key=ALPHA_KEY).headers["X-Cache"] == "HIT"


def test_stats_are_json(gw: Gateway, unique: str) -> None:
    """`GET /admin/cache/stats` shows the worker's L0, the settings in force and the deletions so far."""
    assert cache_of(post(gw, chat(unique))) == "MISS"
    stats = admin(gw, "GET", "/admin/cache/stats")
    assert stats.status_code == 200
    assert stats.headers["Content-Type"].startswith("application/json")
    body = stats.json()
    assert body["l0"]["entries"] >= 1 and body["l0"]["bytes"] > 0
    assert body["ttl_seconds"] == 86400
    assert body["l2"]["enabled"] is False
    assert isinstance(body["generations"], dict)
    assert admin(gw, "DELETE", "/admin/cache").status_code == 200
    after = admin(gw, "GET", "/admin/cache/stats").json()
    assert after["generations"]["*"] == body["generations"].get("*", 0) + 1
    assert after["l0"]["entries"] == 0
