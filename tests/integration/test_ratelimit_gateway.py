"""Per-tenant rate limits through real gunicorn workers sharing one Redis: what a limited client sees."""

from __future__ import annotations

import gc
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Gateway, MockUpstream, base_env, free_port

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

SUFFIX = uuid.uuid4().hex[:10]
# tenant -> limits, all on one gateway with a 60 s window (one unit every 6 s at rpm 10: no refill mid-test)
TENANTS = {
    "exact": {"rpm": 10},
    "tokens": {"tpm": 60},
    "tokens-stream": {"tpm": 60},
    "cached": {"tpm": 2000},
    "left": {"tpm": 1000},
    "conc": {"concurrency": 2},
    "flush": {"rpm": 100},
    "huge16": {"rpm": 1000},
    "huge63": {"rpm": 1000},
}
# per-model limits make the gateway read the body (and so max_tokens) before admitting
MODEL_LIMITS = {"huge16": {"mock-gpt": {"tpm": 1000}}, "huge63": {"mock-gpt": {"tpm": 1000}}}
RESET = re.compile(r"^(\d+ms|\d+(\.\d+)?s|\d+m\d+(\.\d+)?s|\d+h\d+m\d+(\.\d+)?s)$")


def key(tenant: str) -> str:
    return f"sk-rl-{tenant}-{SUFFIX}"


def chat(content: str, **extra: object) -> dict:
    return {"model": "mock-gpt", "messages": [{"role": "user", "content": content}], **extra}


def post(gw: Gateway, api_key: str, body: dict, headers: dict[str, str] | None = None,
         **kwargs: object) -> requests.Response:
    return requests.post(gw.url + "/v1/chat/completions", json=body, timeout=30,
                         headers={"Authorization": f"Bearer {api_key}", **(headers or {})}, **kwargs)


def keys_file(directory: Path, tenants: dict[str, dict[str, int]]) -> str:
    path = directory / "keys.yaml"
    path.write_text(json.dumps({"tenants": [
        {"name": f"rl-{name}-{SUFFIX}", "keys": [key(name)], "limits": limits,
         "model_limits": MODEL_LIMITS.get(name, {})} for name, limits in tenants.items()
    ]}))
    return str(path)


def assert_429(response: requests.Response, kind: str = "requests") -> None:
    """OpenAI's 429: `type` names the kind of limit reached ("requests" or "tokens"), `Retry-After` when to retry."""
    assert response.status_code == 429
    assert response.json()["error"]["type"] == kind
    assert re.fullmatch(r"\d+", response.headers["Retry-After"]) and int(response.headers["Retry-After"]) >= 1


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # A whole window of burst: these tests count admissions against the limit itself (test_ratelimit_burst.py
    # has the default's).
    env = base_env(upstream_server, AUTH_DISABLED="", UPSTREAM_API_KEYS=f"sk-up-rl-{SUFFIX}", RATE_LIMIT_BURST="1",
                   GATEWAY_KEYS_FILE=keys_file(tmp_path_factory.mktemp("rl"), TENANTS))
    gw = Gateway(env, workers=3)
    yield gw
    gc.collect()  # drop finished responses' keep-alive connections, or gunicorn waits GRACEFUL_TIMEOUT
    gw.stop()


@pytest.fixture(scope="module")
def short_gateway(upstream_server: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A 4-second window, to watch the limit refill."""
    env = base_env(upstream_server, AUTH_DISABLED="", UPSTREAM_API_KEYS=f"sk-up-rl-{SUFFIX}",
                   CACHE_ENABLED="false", RATE_LIMIT_WINDOW_SECONDS="4", RATE_LIMIT_BURST="1",
                   GATEWAY_KEYS_FILE=keys_file(tmp_path_factory.mktemp("rl-short"), {"window": {"rpm": 10}}))
    gw = Gateway(env, workers=2)
    yield gw
    gc.collect()  # drop finished responses' keep-alive connections, or gunicorn waits GRACEFUL_TIMEOUT
    gw.stop()


def burst(gw: Gateway, api_key: str, count: int) -> list[requests.Response]:
    """`count` clients at once, each with its own prompt (no cache hits)."""
    start = threading.Barrier(count)

    def one(i: int) -> requests.Response:
        start.wait()
        return post(gw, api_key, chat(f"burst {uuid.uuid4().hex} {i}"))

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_concurrent_clients_get_exactly_the_limit(gateway: Gateway, upstream: MockUpstream) -> None:
    """40 clients at once against rpm 10 over 3 workers: exactly 10 answers, 30 refusals with OpenAI's headers."""
    responses = burst(gateway, key("exact"), 40)
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(ok) == 10
    assert len(refused) == 30
    for response in refused:
        assert_429(response)
        assert response.headers["x-ratelimit-limit-requests"] == "10"
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        assert RESET.match(response.headers["x-ratelimit-reset-requests"])
    assert len(upstream.requests()) == 10


def test_answers_carry_the_rate_limit_headers(gateway: Gateway, upstream: MockUpstream) -> None:
    """A 200 carries x-ratelimit-* too, counting down."""
    first = post(gateway, key("flush"), chat(f"h {uuid.uuid4().hex}"))
    second = post(gateway, key("flush"), chat(f"h {uuid.uuid4().hex}"))
    assert first.status_code == second.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "100"
    assert RESET.match(first.headers["x-ratelimit-reset-requests"])
    assert int(second.headers["x-ratelimit-remaining-requests"]) < int(first.headers["x-ratelimit-remaining-requests"])
    assert "Retry-After" not in first.headers


def test_no_second_burst_at_the_window_edge_and_refill(short_gateway: Gateway, upstream: MockUpstream) -> None:
    """After spending 10 of rpm 10, half a window later about 5 more pass (never 10); a full window later, 10."""
    api_key = key("window")
    assert sum(r.status_code == 200 for r in burst(short_gateway, api_key, 10)) == 10
    time.sleep(2.1)  # just past half of the 4 s window
    edge = burst(short_gateway, api_key, 10)
    admitted = sum(r.status_code == 200 for r in edge)
    assert 4 <= admitted <= 6
    for response in edge:
        if response.status_code != 200:
            assert_429(response)
    time.sleep(4.1)
    assert sum(r.status_code == 200 for r in burst(short_gateway, api_key, 10)) == 10
    assert_429(post(short_gateway, api_key, chat("one too many")))


def usage_of(upstream: MockUpstream, body: dict) -> int:
    """What the mock will charge for `body` (it is deterministic), asked directly."""
    answer = requests.post(upstream.url + "/v1/chat/completions", json={**body, "stream": False},
                           headers={"Authorization": "Bearer sk-probe"}, timeout=10).json()
    return answer["usage"]["total_tokens"]


def test_settled_token_usage_refuses_once_the_budget_is_spent(gateway: Gateway, upstream: MockUpstream) -> None:
    """tpm 60: the first answer's real usage is charged; the next request is refused with what is left."""
    body = chat(f"tokens {uuid.uuid4().hex} " + "word " * 20)
    used = usage_of(upstream, body)
    first = post(gateway, key("tokens"), body)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "60"
    assert first.json()["usage"]["total_tokens"] == used
    time.sleep(0.1)  # usage is settled when the answer closes, just after the client has it
    second = post(gateway, key("tokens"), chat(f"again {uuid.uuid4().hex}"))
    assert_429(second, "tokens")
    assert second.headers["x-ratelimit-limit-tokens"] == "60"
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    assert 60 - used <= remaining <= 60 - used + 2  # the settled usage, not the estimate and not nothing


def test_streamed_usage_is_charged_without_showing_it(gateway: Gateway, upstream: MockUpstream) -> None:
    """A stream's usage is asked of the upstream and charged; the client that did not ask sees no usage chunk."""
    body = chat(f"stream {uuid.uuid4().hex} " + "word " * 20, stream=True)
    used = usage_of(upstream, body)
    upstream.reset()
    with post(gateway, key("tokens-stream"), body, stream=True) as first:
        assert first.status_code == 200
        events = [line[6:] for line in first.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks and all(chunk.get("choices") for chunk in chunks)
    assert not any(chunk.get("usage") for chunk in chunks)
    (sent,) = upstream.requests()
    assert sent["body"]["stream_options"] == {"include_usage": True}
    time.sleep(0.1)  # usage is settled when the stream closes
    second = post(gateway, key("tokens-stream"), chat(f"again {uuid.uuid4().hex}", stream=True))
    assert_429(second, "tokens")
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    assert 60 - used <= remaining <= 60 - used + 2


def test_a_client_leaving_mid_stream_is_charged_the_estimate(gateway: Gateway, upstream: MockUpstream) -> None:
    """The client hangs up before the usage chunk: the upstream was still paid, so the reservation (the estimate)
    stays charged instead of being refunded, or hanging up early would make every stream free."""
    upstream.faults({"kind": "slow_chunks", "delay": 0.4, "times": 1})
    body = chat(f"leaving {uuid.uuid4().hex}", stream=True)
    with post(gateway, key("left"), body, stream=True) as first:
        assert first.status_code == 200
        next(first.iter_lines())  # one event, then hang up
    time.sleep(1.2)  # the gateway notices at its next write, then settles
    second = post(gateway, key("left"), chat(f"after {uuid.uuid4().hex}"))
    assert second.status_code == 200
    charged = 1000 - int(second.headers["x-ratelimit-remaining-tokens"])
    # both estimates (~256 + body/4 each) minus ~2 s of refill at 1000/min; a refund would leave about half
    assert charged >= 420, charged


def test_stream_client_asking_for_usage_gets_it(gateway: Gateway, upstream: MockUpstream) -> None:
    """stream_options.include_usage from the client: the usage chunk reaches it."""
    body = chat(f"usage {uuid.uuid4().hex}", stream=True, stream_options={"include_usage": True})
    with post(gateway, key("cached"), body, stream=True) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith(b"data: ")]
    usage = [json.loads(e)["usage"] for e in events[:-1] if json.loads(e).get("usage")]
    assert len(usage) == 1 and usage[0]["total_tokens"] > 0


def test_cache_hits_cost_no_tokens(gateway: Gateway, upstream: MockUpstream) -> None:
    """Repeating a cached request does not lower x-ratelimit-remaining-tokens: its reservation is given back."""
    body = chat(f"cached {uuid.uuid4().hex}")
    miss = post(gateway, key("cached"), body)
    assert miss.status_code == 200 and miss.headers["X-Cache"] == "MISS"
    used = miss.json()["usage"]["total_tokens"]
    time.sleep(0.1)
    hit = post(gateway, key("cached"), body)
    assert hit.headers["X-Cache"] == "HIT"
    time.sleep(0.1)
    again = post(gateway, key("cached"), body)
    assert again.headers["X-Cache"] == "HIT"
    remaining_miss = int(miss.headers["x-ratelimit-remaining-tokens"])
    remaining_hit = int(hit.headers["x-ratelimit-remaining-tokens"])
    remaining_again = int(again.headers["x-ratelimit-remaining-tokens"])
    # each response shows the budget minus its own reservation; only the miss's real usage stays spent
    assert remaining_miss - used - 1 <= remaining_hit <= remaining_miss - used + 40
    assert remaining_again >= remaining_hit
    assert len(upstream.requests()) == 1


def test_concurrency_limit(gateway: Gateway, upstream: MockUpstream) -> None:
    """Concurrency 2 with a slow upstream: a third request in flight is refused; once they end, it passes."""
    upstream.faults({"kind": "delay", "seconds": 1.5, "times": 2})
    with ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(post, gateway, key("conc"), chat(f"slow {uuid.uuid4().hex}")) for _ in range(2)]
        time.sleep(0.5)
        third = post(gateway, key("conc"), chat(f"third {uuid.uuid4().hex}"))
        assert [f.result().status_code for f in slow] == [200, 200]
    assert_429(third)
    time.sleep(0.1)  # slots are released when the answers close
    assert post(gateway, key("conc"), chat(f"fourth {uuid.uuid4().hex}")).status_code == 200


def test_one_request_id_on_every_request_does_not_share_a_slot(gateway: Gateway, upstream: MockUpstream) -> None:
    """A client sending the same X-Request-ID on concurrent requests is limited like any other (the id is kept
    for logs and headers, but is not what holds the slot)."""
    upstream.faults({"kind": "delay", "seconds": 1.5, "times": 2})
    same = {"X-Request-ID": f"same-{uuid.uuid4().hex}"}
    with ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(post, gateway, key("conc"), chat(f"slow {uuid.uuid4().hex}"), headers=same)
                for _ in range(2)]
        time.sleep(0.5)
        third = post(gateway, key("conc"), chat(f"third {uuid.uuid4().hex}"), headers=same)
        assert [f.result().status_code for f in slow] == [200, 200]
    assert_429(third)
    assert third.headers["X-Request-ID"] == same["X-Request-ID"]


def test_script_flush_is_survived(gateway: Gateway, upstream: MockUpstream, redis_conn: redis.Redis) -> None:
    """SCRIPT FLUSH between requests (a Redis restart, a failover): the next request is still limited and served."""
    before = post(gateway, key("flush"), chat(f"f {uuid.uuid4().hex}"))
    redis_conn.script_flush()
    after = [post(gateway, key("flush"), chat(f"f {uuid.uuid4().hex}")) for _ in range(3)]  # reach every worker
    assert before.status_code == 200 and all(r.status_code == 200 for r in after)
    remaining = [int(r.headers["x-ratelimit-remaining-requests"]) for r in (before, *after)]
    assert remaining[-1] < remaining[0]


@pytest.mark.parametrize(("tenant", "max_tokens"), [("huge16", 10**16), ("huge63", 2**63)], ids=["1e16", "2**63"])
def test_huge_max_tokens_is_rate_limited_not_failed_open(gateway: Gateway, upstream: MockUpstream, tenant: str,
                                                         max_tokens: int) -> None:
    """A huge max_tokens takes the whole token budget: answered and limited, no Redis error, no fail-open."""
    errors_before = redis_errors(gateway)
    response = post(gateway, key(tenant), chat(f"huge {uuid.uuid4().hex}", max_tokens=max_tokens))
    assert response.status_code == 200
    assert response.headers["x-ratelimit-limit-tokens"] == "1000"  # the per-model limit
    assert response.headers["x-ratelimit-remaining-tokens"] == "0"
    # the limiter still answers for this tenant (failing open would send no x-ratelimit-* headers)
    assert "x-ratelimit-limit-tokens" in post(gateway, key(tenant), chat(f"next {uuid.uuid4().hex}")).headers
    assert redis_errors(gateway) == errors_before


def redis_errors(gw: Gateway) -> float:
    text = requests.get(gw.metrics_url, timeout=10, headers={"Connection": "close"}).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "gateway_redis_errors" for sample in family.samples
               if sample.name == "gateway_redis_errors_total")


@pytest.mark.parametrize("fail_closed", [False, True], ids=["fail-open", "fail-closed"])
def test_redis_down(upstream_server: MockUpstream, upstream: MockUpstream, fail_closed: bool) -> None:
    """Redis unreachable: answered anyway by default, 503 with RATE_LIMIT_FAIL_CLOSED; counted on /metrics."""
    env = base_env(upstream_server, UPSTREAM_API_KEYS=f"sk-up-rl-{SUFFIX}", RATE_LIMIT_RPM="100",
                   REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", RATE_LIMIT_FAIL_CLOSED=str(fail_closed).lower())
    gw = Gateway(env, workers=1)
    try:
        response = requests.post(gw.url + "/v1/chat/completions", json=chat(f"down {uuid.uuid4().hex}"), timeout=30,
                                 headers={"Connection": "close"})
        if fail_closed:
            assert response.status_code == 503
            error = response.json()["error"]
            assert error["code"] == "rate_limiter_unavailable" and isinstance(error["message"], str)
            assert upstream.requests() == []
        else:
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"].startswith("Mock answer to: down")
        assert redis_errors(gw) >= 1
    finally:
        gw.stop()
