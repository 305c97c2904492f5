"""/metrics over several gunicorn workers: every /v1 request counted once, by status, with bounded labels."""

from __future__ import annotations

import gc
import json
import random
import string
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Gateway, MockUpstream, base_env

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

SUFFIX = uuid.uuid4().hex[:10]
OPEN_KEY, LIMITED_KEY = f"sk-met-open-{SUFFIX}", f"sk-met-lim-{SUFFIX}"
ROUTES = {"chat", "completions", "embeddings", "models", "other"}
CACHE_LABELS = {"L0", "L1", "L2", "MISS", "BYPASS", "NONE"}


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    keys = tmp_path_factory.mktemp("metrics") / "keys.yaml"
    keys.write_text(json.dumps({"tenants": [
        {"name": f"met-open-{SUFFIX}", "keys": [OPEN_KEY]},
        {"name": f"met-lim-{SUFFIX}", "keys": [LIMITED_KEY], "limits": {"rpm": 2}},
    ]}))
    gw = Gateway(base_env(upstream_server, AUTH_DISABLED="", GATEWAY_KEYS_FILE=str(keys),
                          UPSTREAM_API_KEYS=f"sk-up-met-{SUFFIX}", RATE_LIMIT_BURST="1"),  # rpm 2: 2 at once
                 workers=2)
    yield gw
    gc.collect()  # drop finished responses' keep-alive connections, or gunicorn waits GRACEFUL_TIMEOUT
    gw.stop()


def families(gw: Gateway) -> dict[str, list]:
    text = requests.get(gw.metrics_url, timeout=10).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def chat(gw: Gateway, api_key: str, content: str, model: str = "mock-gpt") -> requests.Response:
    return requests.post(gw.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {api_key}"},
                         json={"model": model, "messages": [{"role": "user", "content": content}]})


def test_requests_are_counted_once_each_by_status(gateway: Gateway, upstream: MockUpstream) -> None:
    """200s, a cache hit, 401s, 429s, 404s: the counter and the histogram both add up to what was sent."""
    before = families(gateway)
    assert not any(s.name == "gateway_requests_total" for s in before.get("gateway_requests", []))
    long_model = "".join(random.choices(string.ascii_letters, k=5000))
    statuses: list[int] = []
    statuses += [chat(gateway, OPEN_KEY, f"metrics {uuid.uuid4().hex}").status_code for _ in range(5)]
    repeated = f"metrics repeated {SUFFIX}"
    statuses.append(chat(gateway, OPEN_KEY, repeated).status_code)
    time.sleep(0.1)
    hit = chat(gateway, OPEN_KEY, repeated)
    assert hit.headers["X-Cache"] == "HIT"
    statuses.append(hit.status_code)
    statuses += [chat(gateway, "sk-wrong", "nope").status_code for _ in range(3)]
    statuses += [chat(gateway, LIMITED_KEY, f"lim {uuid.uuid4().hex}").status_code for _ in range(4)]
    statuses.append(chat(gateway, OPEN_KEY, "long model", model=long_model).status_code)
    statuses.append(requests.get(gateway.url + "/v1/no-such-route", timeout=10).status_code)
    statuses.append(requests.get(gateway.url + "/v1/models", timeout=10,
                                 headers={"Authorization": f"Bearer {OPEN_KEY}"}).status_code)
    requests.get(gateway.url + "/healthz", timeout=10)  # not /v1: not counted
    expected = Counter(str(s) for s in statuses)
    assert expected["401"] == 3 and expected["429"] == 2 and expected["404"] >= 1

    deadline = time.monotonic() + 5
    while True:  # requests are counted when their answer closes, in whichever worker served them
        samples = families(gateway)
        counted = [s for s in samples.get("gateway_requests", []) if s.name == "gateway_requests_total"]
        if sum(s.value for s in counted) >= len(statuses) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sum(s.value for s in counted) == len(statuses)
    by_status: Counter[str] = Counter()
    for sample in counted:
        by_status[sample.labels["status"]] += int(sample.value)
    assert by_status == expected
    hits = sum(s.value for s in counted if s.labels["cache"] in ("L0", "L1", "L2"))
    assert hits == 1

    durations = samples["gateway_request_duration_seconds"]
    assert sum(s.value for s in durations if s.name == "gateway_request_duration_seconds_count") == len(statuses)

    labels = [value for family in samples.values() for sample in family for value in sample.labels.values()]
    assert long_model not in labels and not any(len(value) > 200 for value in labels)
    assert {s.labels["route"] for s in counted} <= ROUTES
    assert {s.labels["cache"] for s in counted} <= CACHE_LABELS
    assert sum(s.value for s in samples["gateway_ratelimited"] if s.name == "gateway_ratelimited_total") == 2
