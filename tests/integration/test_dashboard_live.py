"""Every metric the Grafana dashboard queries is on a live gateway's /metrics once traffic has exercised it.

prometheus_client's multiprocess mode writes a family only after its first observation, so the test first
drives traffic through every path: a miss, an L0 hit, an L2 hit, a 5xx retry, an upstream key's 429, a
gateway 429, and tokens.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
import requests

from tests.support import Gateway, MockUpstream, base_env
from tests.support_dashboard import dashboard_metric_names, exposition_metric_names, family_name

pytestmark = [pytest.mark.gunicorn, pytest.mark.redis]

MODEL = "mock-gpt"
RPM = 12


@pytest.fixture
def keys(unique: str) -> dict[str, str]:
    # Unique upstream keys: their health is shared through Redis, and must not reach other tests' gateways.
    return {"client": f"sk-client-{unique}", "k1": f"sk-k1-{unique}", "k2": f"sk-k2-{unique}"}


@pytest.fixture
def gateway(upstream: MockUpstream, keys: dict[str, str], unique: str) -> Iterator[Gateway]:
    gw = Gateway(base_env(
        upstream, AUTH_DISABLED="false", GATEWAY_API_KEYS=f"dash-{unique}:{keys['client']}",
        RATE_LIMIT_RPM=str(RPM), UPSTREAM_API_KEYS=f"{keys['k1']},{keys['k2']}",
        SEMANTIC_CACHE_ENABLED="true", UPSTREAM_MAX_RETRIES="2",
        RATE_LIMIT_BURST="1",  # the first requests must pass before the flood meets the limit
    ))
    try:
        yield gw
    finally:
        gw.stop()


def chat(gw: Gateway, key: str, content: str) -> requests.Response:
    return requests.post(
        gw.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
        json={"model": MODEL, "temperature": 0, "messages": [{"role": "user", "content": content}]},
    )


def sample_names(text: str) -> set[str]:
    """The series names of every sample line on a Prometheus text page."""
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_dashboard_metric_is_exported_after_traffic(
    gateway: Gateway, upstream: MockUpstream, keys: dict[str, str], unique: str
) -> None:
    """Traffic over every path makes every family the dashboard queries appear, histograms with _bucket series."""
    client = keys["client"]
    first = chat(gateway, client, f"How do I reset my password? {unique}")
    assert first.status_code == 200 and first.headers["X-Cache"] == "MISS"
    again = chat(gateway, client, f"How do I reset my password? {unique}")
    assert again.headers.get("X-Cache-Layer") == "L0"
    time.sleep(1.0)  # the L2 entry is written after the answer; the other worker syncs every 0.5 s
    paraphrase = chat(gateway, client, f"How can I reset my password? {unique}")
    assert paraphrase.status_code == 200
    assert paraphrase.headers.get("X-Cache-Layer") == "L2", paraphrase.headers

    upstream.faults({"status": 503})
    assert chat(gateway, client, f"retried {unique}").status_code == 200

    # One key answers 429 (until cooled down); each request moves on to the other key and succeeds.
    upstream.faults({"status": 429, "retry_after": 30, "key": keys["k1"], "times": -1})
    for i in range(8):  # the key is chosen by load, ties at random: go on until k1 has been tried (RPM 12)
        assert chat(gateway, client, f"key cooling {i} {unique}").status_code == 200
        if any(r["key"] == keys["k1"] for r in upstream.requests()):
            break
    assert any(r["key"] == keys["k1"] for r in upstream.requests()), "k1 was never tried"

    statuses = [chat(gateway, client, f"flood {i} {unique}").status_code for i in range(RPM)]
    assert 429 in statuses, statuses

    page = requests.get(gateway.metrics_url, timeout=10)
    assert page.status_code == 200
    exported = exposition_metric_names(page.text)
    queried = dashboard_metric_names()
    assert queried, "the dashboard queries no gateway_* metric"
    assert queried <= exported, f"queried by the dashboard but not on /metrics: {sorted(queried - exported)}"

    samples = sample_names(page.text)
    histograms = {
        line.split()[2] for line in page.text.splitlines() if line.startswith("# TYPE ") and line.endswith(" histogram")
    }
    for name in queried & histograms:
        assert f"{name}_bucket" in samples, f"{name} has no _bucket samples"
    counters = {family_name(name) for name in queried if name.endswith("_total")}
    for name in counters:
        assert name in samples, f"{name} has no samples"

    # The traffic did what the comments above claim, so a missing family would be the exporter's fault.
    text = page.text
    assert re.search(r'gateway_cache_lookups_total\{layer="L0",result="hit"\}', text)
    assert re.search(r'gateway_cache_lookups_total\{layer="L2",result="hit"\}', text)
    assert re.search(r'gateway_upstream_retries_total\{reason="5xx"\}', text)
    assert re.search(r'gateway_upstream_retries_total\{reason="429"\}', text)
    assert re.search(r'gateway_ratelimited_total\{dimension="requests"\}', text)
    assert re.search(r'gateway_upstream_key_state\{[^}]*key_id="[^"]+"[^}]*\} 1\.0', text), "no key cooling"
