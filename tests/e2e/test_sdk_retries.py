"""The openai SDK with its default retries: the gateway's own retries are not multiplied by the client's."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import openai
import pytest

from tests.support import Gateway, MockUpstream, base_env

pytestmark = [pytest.mark.e2e, pytest.mark.gunicorn, pytest.mark.redis]

RETRIES = 2


@pytest.fixture(scope="module")
def gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    keys = f"sk-sdkretry-a-{uuid.uuid4().hex},sk-sdkretry-b-{uuid.uuid4().hex}"
    gw = Gateway(base_env(upstream_server, UPSTREAM_API_KEYS=keys, UPSTREAM_MAX_RETRIES=str(RETRIES),
                          CACHE_ENABLED="false"))
    yield gw
    gw.stop()


@pytest.fixture
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client", timeout=30)  # default max_retries
    yield sdk
    sdk.close()


def ask(client: openai.OpenAI) -> None:
    client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": uuid.uuid4().hex}])


def test_always_503_costs_at_most_the_gateway_budget(client: openai.OpenAI, upstream: MockUpstream) -> None:
    """An upstream answering 503 forever: one SDK call, at most UPSTREAM_MAX_RETRIES + 1 upstream attempts in all
    (over both keys), and the SDK sees the 503."""
    assert client.max_retries == 2
    upstream.faults({"status": 503, "times": -1})
    with pytest.raises(openai.InternalServerError) as info:
        ask(client)
    assert info.value.status_code == 503
    assert len(upstream.requests()) <= RETRIES + 1


@pytest.mark.parametrize("fault", [
    {"status": 429, "type": "insufficient_quota", "code": "insufficient_quota", "times": -1},
    {"status": 402, "times": -1},
])
def test_out_of_credit_is_one_attempt_per_key(client: openai.OpenAI, upstream: MockUpstream, fault: dict) -> None:
    """insufficient_quota / 402: each key is asked once (another key may have credit), the SDK does not retry."""
    upstream.faults(fault)
    with pytest.raises(openai.APIStatusError) as info:
        ask(client)
    assert info.value.status_code == fault["status"]
    assert sorted(r["key"] for r in upstream.requests()) == sorted({r["key"] for r in upstream.requests()})
    assert len(upstream.requests()) == 2


@pytest.fixture(scope="module")
def no_retry_gateway(upstream_server: MockUpstream) -> Iterator[Gateway]:
    gw = Gateway(base_env(upstream_server, UPSTREAM_API_KEYS=f"sk-sdkretry-0-{uuid.uuid4().hex}",
                          UPSTREAM_MAX_RETRIES="0", CACHE_ENABLED="false"))
    yield gw
    gw.stop()


def test_no_gateway_retries_means_one_attempt(no_retry_gateway: Gateway, upstream: MockUpstream) -> None:
    """UPSTREAM_MAX_RETRIES=0: a 503 and a connection reset each cost one upstream attempt, whatever the SDK's
    default retries."""
    sdk = openai.OpenAI(base_url=no_retry_gateway.url + "/v1", api_key="sk-client", timeout=30)
    try:
        upstream.faults({"status": 503, "times": -1})
        with pytest.raises(openai.InternalServerError):
            ask(sdk)
        assert len(upstream.requests()) == 1
        upstream.reset()
        upstream.faults({"kind": "reset", "times": -1})
        with pytest.raises(openai.APIStatusError) as info:
            ask(sdk)
        assert info.value.status_code == 502 and len(upstream.requests()) == 1
    finally:
        sdk.close()
