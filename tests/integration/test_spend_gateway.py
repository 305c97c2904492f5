"""Spend and budgets through real gunicorn workers sharing one Redis: what a budgeted tenant and an operator see."""

from __future__ import annotations

import gc
import json
import math
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Gateway, MockUpstream, base_env, wait_until

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

SUFFIX = uuid.uuid4().hex[:10]
ADMIN = f"admin-spend-{SUFFIX}"
WINDOW = 8.0  # BUDGET_TEST_WINDOW_SECONDS: a budget "day" of 8 s
# USD per million tokens: output dominates, input is over-estimated (bytes / 4), so settling changes the counter.
PRICES = {"models": {"mock-gpt": {"input": 10, "cached_input": 1, "output": 1000},
                     "deepseek-chat": {"input": 0.28, "cached_input": 0.028, "output": 0.42}}}
BUDGET_USD = 0.5
MAX_TOKENS = 5
TENANTS = {
    "capped": {"budget": {"usd_per_day": BUDGET_USD}},
    "report": {},
    "unpriced": {"budget": {"usd_per_day": 1}},
}


def key(tenant: str) -> str:
    return f"sk-spend-{tenant}-{SUFFIX}"


def tenant_name(tenant: str) -> str:
    return f"sp-{tenant}-{SUFFIX}"


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("spend")
    keys, prices = directory / "keys.yaml", directory / "prices.yaml"
    keys.write_text(json.dumps({"tenants": [
        {"name": tenant_name(name), "keys": [key(name)], **extra} for name, extra in TENANTS.items()
    ]}))
    prices.write_text(json.dumps(PRICES))
    env = base_env(upstream_server, AUTH_DISABLED="", GATEWAY_KEYS_FILE=str(keys), PRICES_FILE=str(prices),
                   ADMIN_API_KEY=ADMIN, BUDGET_TEST_WINDOW_SECONDS=str(WINDOW), UPSTREAM_API_KEYS=f"sk-up-sp-{SUFFIX}")
    gw = Gateway(env, workers=2)
    yield gw
    gc.collect()
    gw.stop()


def chat(content: str, model: str = "mock-gpt", **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS, **extra}


def post(gw: Gateway, api_key: str, body: dict, **kwargs: object) -> requests.Response:
    return requests.post(gw.url + "/v1/chat/completions", json=body, timeout=30,
                         headers={"Authorization": f"Bearer {api_key}"}, **kwargs)


def nanos(per_million: float, tokens: int) -> int:
    return round(per_million * 1000 * tokens)


def worst_case(body: dict) -> int:
    """What the gateway reserves for `body` (nano-dollars): bytes / 4 prompt tokens at the input price, max_tokens
    at the output price."""
    price = PRICES["models"][body["model"]]
    return nanos(price["input"], len(json.dumps(body).encode()) // 4) + nanos(price["output"], body["max_tokens"])


def assert_budget_refusal(response: requests.Response) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "insufficient_quota" and error["type"] == "insufficient_quota"
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["x-budget-limit-usd-day"] == "0.5"
    assert float(response.headers["x-budget-remaining-usd-day"]) >= 0
    assert response.headers["x-budget-reset-day"].endswith("s")
    assert int(response.headers["Retry-After"]) >= 1


def test_budget_holds_across_workers_and_frees_at_the_reset(gateway: Gateway, upstream: MockUpstream) -> None:
    """50 clients over 2 workers against a $0.50 budget: admitted spend within one worst case of the budget, the
    next request refused with insufficient_quota, and the budget back once the window resets."""
    body = chat("x" * 32)  # every body the same size: the same worst case
    w = worst_case(body)
    # Start at the beginning of a budget window, so the whole stampede falls in one.
    wait = WINDOW - time.time() % WINDOW
    time.sleep(wait + 0.05 if wait < WINDOW - 0.5 else 0)
    started = time.time()
    admitted: list[dict] = []
    lock = threading.Lock()

    def client(_: int) -> None:
        refusals = 0
        while refusals < 2:  # a refusal may only be other clients' reservations: look again once they settled
            response = post(gateway, key("capped"), chat(uuid.uuid4().hex))
            if response.status_code == 200:
                refusals = 0
                with lock:
                    admitted.append(response.json()["usage"])
            else:
                assert_budget_refusal(response)
                refusals += 1
                time.sleep(0.3)

    with ThreadPoolExecutor(50) as pool:
        list(pool.map(client, range(50)))
    assert time.time() - started < WINDOW - 0.5, "the stampede outlasted one budget window: not a valid run"
    price = PRICES["models"]["mock-gpt"]
    spent = sum(nanos(price["input"], u["prompt_tokens"]) + nanos(price["output"], u["completion_tokens"])
                for u in admitted)
    budget = round(BUDGET_USD * 1e9)
    assert budget - w <= spent <= budget + w, (len(admitted), spent, budget, w)
    refused = post(gateway, key("capped"), chat(uuid.uuid4().hex))
    assert_budget_refusal(refused)
    left = float(refused.headers["x-budget-remaining-usd-day"]) * 1e9
    assert left < w and math.isclose(left, budget - spent, abs_tol=2000)  # the counter holds the real spend
    time.sleep(int(refused.headers["Retry-After"]) + 0.2)
    again = post(gateway, key("capped"), chat(uuid.uuid4().hex))
    assert again.status_code == 200, again.text
    assert float(again.headers["x-budget-remaining-usd-day"]) == pytest.approx((budget - w) / 1e9, abs=1e-6)


def test_spend_report_matches_the_log_lines_and_the_savings_the_hits(gateway: Gateway, upstream: MockUpstream) -> None:
    """/admin/spend per tenant and model adds up to the log lines' cost_usd; each hit saved what its miss cost."""
    prompts = [f"report {uuid.uuid4().hex} {i}" for i in range(4)]
    for model in ("mock-gpt", "deepseek-chat"):
        for prompt in prompts:  # long enough a max_tokens for a whole answer ("length" answers are not cached)
            assert post(gateway, key("report"), chat(prompt, model, max_tokens=64)).status_code == 200
        streamed = post(gateway, key("report"), chat(prompts[0] + " streamed", model, stream=True, max_tokens=64),
                        stream=True)
        assert streamed.status_code == 200
        streamed.content  # noqa: B018 - read to the end
        time.sleep(0.2)  # the answers are stored after they were sent (visible within 100 ms)
        for prompt in prompts[:3]:
            hit = post(gateway, key("report"), chat(prompt, model, max_tokens=64))
            assert hit.headers["X-Cache"] == "HIT"
    tenant = tenant_name("report")
    admin = {"Authorization": f"Bearer {ADMIN}"}

    def report() -> list[dict]:
        answer = requests.get(f"{gateway.url}/admin/spend", params={"tenant": tenant}, headers=admin, timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()["data"]

    wait_until(lambda: sum(r["requests"] for r in report()) == 16, 10, "the rollups of 16 requests")
    lines = [line for line in gateway.request_lines() if line.get("tenant") == tenant]
    assert len(lines) == 16
    rows = {row["model"]: row for row in report()}
    assert set(rows) == {"mock-gpt", "deepseek-chat"}
    for model, row in rows.items():
        mine = [line for line in lines if line["model"] == model]
        assert row["requests"] == 8 and row["cache_hits"] == 3
        assert row["cost_usd"] == pytest.approx(sum(line["cost_usd"] or 0 for line in mine), abs=1e-9)
        assert row["cost_usd"] > 0
        assert row["input_tokens"] == sum(line["prompt_tokens"] or 0 for line in mine if line["cache"] == "MISS")
        assert row["saved_usd"] == pytest.approx(sum(line["saved_usd"] or 0 for line in mine), abs=1e-9)
        hits = [line for line in mine if line["cache"] in ("L0", "L1", "L2")]
        assert len(hits) == 3 and sum(row["cache_hits_by_layer"].values()) == 3
        # every plain prompt has the same usage, so each hit saved exactly what each plain miss cost
        miss_costs = {line["cost_usd"] for line in mine if line["cache"] == "MISS" and not line["stream"]}
        assert len(miss_costs) == 1
        for line in hits:
            assert line["cost_usd"] is None and line["saved_usd"] == pytest.approx(next(iter(miss_costs)), abs=1e-12)
        assert row["saved_usd"] == pytest.approx(3 * next(iter(miss_costs)), abs=1e-9)
    by_tenant = requests.get(f"{gateway.url}/admin/spend", params={"tenant": tenant, "group_by": "tenant"},
                             headers=admin, timeout=10).json()["data"]
    assert by_tenant == [{**by_tenant[0], "tenant": tenant}] and "model" not in by_tenant[0]
    assert by_tenant[0]["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows.values()), abs=1e-9)
    families = {f.name: f for f in text_string_to_metric_families(requests.get(gateway.metrics_url, timeout=5).text)}
    cost = {s.labels["model"]: s.value for s in families["gateway_cost_usd"].samples if s.name.endswith("_total")}
    saved = {s.labels["model"]: s.value for s in families["gateway_cost_saved_usd"].samples
             if s.name.endswith("_total")}
    assert cost["deepseek-chat"] >= rows["deepseek-chat"]["cost_usd"] > 0
    assert saved["mock-gpt"] >= rows["mock-gpt"]["saved_usd"] > 0


def test_admin_spend_refuses_bad_queries(gateway: Gateway) -> None:
    """Bad dates, a reversed range and unknown groupings are 400s naming the parameter; no key is a 401."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for params, param in (({"from": "2026-13-01"}, "from"), ({"to": "yesterday"}, "to"),
                          ({"from": "2026-02-02", "to": "2026-02-01"}, "from"), ({"group_by": "week"}, "group_by"),
                          ({"from": "2000-01-01"}, "from")):
        answer = requests.get(f"{gateway.url}/admin/spend", params=params, headers=admin, timeout=10)
        assert answer.status_code == 400, (params, answer.text)
        assert answer.json()["error"]["param"] == param
    assert requests.get(f"{gateway.url}/admin/spend", timeout=10).status_code == 401


def test_a_budgeted_tenant_cannot_use_an_unpriced_model(gateway: Gateway) -> None:
    """No price, no cap: refused (403 model_not_priced) rather than spending without a limit."""
    response = post(gateway, key("unpriced"), chat("hello", "mock-unpriced"))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "model_not_priced"
    priced = post(gateway, key("unpriced"), chat(f"hello {uuid.uuid4().hex}"))
    assert priced.status_code == 200 and priced.headers["x-budget-limit-usd-day"] == "1"
    assert "x-budget-limit-usd-day" not in post(gateway, key("report"), chat(uuid.uuid4().hex)).headers


def test_a_runtime_key_carries_a_budget(gateway: Gateway) -> None:
    """POST /admin/keys with a budget: capped like a file tenant; PATCH raises it everywhere within a second."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    body = chat(uuid.uuid4().hex)
    created = requests.post(f"{gateway.url}/admin/keys", headers=admin, timeout=10, json={
        "tenant": f"sp-rt-{SUFFIX}", "budget": {"usd_per_day": round(1.5 * worst_case(body) / 1e9, 6)}})
    assert created.status_code == 201, created.text
    assert created.json()["budget"]["usd_per_day"] > 0
    secret, key_id = created.json()["key"], created.json()["id"]
    assert post(gateway, secret, body).status_code == 200
    refused = post(gateway, secret, chat(uuid.uuid4().hex))
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    bad = requests.patch(f"{gateway.url}/admin/keys/{key_id}", headers=admin, timeout=10,
                         json={"budget": {"usd_per_week": 1}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "budget"
    raised = requests.patch(f"{gateway.url}/admin/keys/{key_id}", headers=admin, timeout=10,
                            json={"budget": {"usd_per_day": 1}})
    assert raised.status_code == 200, raised.text
    time.sleep(1.0)
    assert post(gateway, secret, chat(uuid.uuid4().hex)).status_code == 200
    listed = requests.get(f"{gateway.url}/admin/keys", params={"tenant": f"sp-rt-{SUFFIX}"}, headers=admin,
                          timeout=10).json()["data"]
    assert listed[0]["budget"] == {"usd_per_day": 1, "usd_per_month": None}
