"""Prices, costs, budget windows and a request's accounting: pure logic, no Redis."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from app.auth import AuthConfigError, TenantLimits, load_keys_file
from app.observability.record import RequestRecord
from app.ratelimit.admission import budget_headers, worst_case_usage
from app.ratelimit.limiter import BudgetState
from app.spend.budget import Budget, parse_budget, usd_text, windows
from app.spend.prices import Price, Prices, PricesError, Usage, load_prices, usage_of
from app.spend.service import Spend


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def test_default_prices_name_deepseek_and_openai_models() -> None:
    """The shipped list prices DeepSeek's cache hits apart and the common OpenAI models."""
    prices = load_prices(None)
    chat = prices.price("deepseek-chat")
    assert chat is not None and chat.cached_input < chat.input
    for model in ("deepseek-reasoner", "gpt-4o", "gpt-4o-mini", "gpt-4.1-mini", "text-embedding-3-small"):
        assert prices.named(model)
    assert prices.price("no-such-model") is None


def test_deepseek_cache_hits_are_priced_as_cached_input() -> None:
    """DeepSeek: prompt_cache_hit_tokens at the cached price, the misses at the input price, output apart."""
    usage = usage_of({"prompt_tokens": 1000, "completion_tokens": 200, "prompt_cache_hit_tokens": 600,
                      "prompt_cache_miss_tokens": 400})
    assert usage == Usage(input=1000, cached=600, output=200)
    price = Price(input=270_000, cached_input=70_000, output=1_100_000)  # 0.27 / 0.07 / 1.10 per million
    # 400 x 0.27 + 600 x 0.07 + 200 x 1.10 = 108 + 42 + 220 = 370 micro-dollars
    assert price.nanos(usage) == 370_000


def test_openai_cached_tokens_are_priced_as_cached_input() -> None:
    """OpenAI: prompt_tokens_details.cached_tokens; never more cached than prompt tokens."""
    assert usage_of({"prompt_tokens": 50, "completion_tokens": 5,
                     "prompt_tokens_details": {"cached_tokens": 30}}) == Usage(50, 30, 5)
    assert usage_of({"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 99}}) == Usage(10, 10, 0)
    assert usage_of({"prompt_tokens": 10, "total_tokens": 10}) == Usage(10, 0, 0)  # embeddings
    assert usage_of({"total_tokens": 3}) is None and usage_of("nonsense") is None
    assert usage_of({"prompt_tokens": -1, "completion_tokens": True}) is None


def test_a_fraction_of_a_nano_dollar_rounds_half_up() -> None:
    """0.0375 $/M x 1 token = 37.5 nano-dollars -> 38; x 2 tokens = 75 exactly; 0.0004 $/M x 1 -> 0."""
    price = Price(input=37_500, cached_input=400, output=0)
    assert price.nanos(Usage(1, 0, 0)) == 38 and price.nanos(Usage(2, 0, 0)) == 75
    assert price.nanos(Usage(1, 1, 0)) == 0


def test_prices_file_is_checked(tmp_path: Path) -> None:
    """Bad files fail at start with where; `*` prices the rest; cached_input defaults to input."""
    path = tmp_path / "prices.yaml"
    path.write_text("models:\n  m: {input: 1.5, output: 2}\n  '*': {input: 0.1}\n")
    prices = load_prices(str(path))
    assert prices.price("m") == Price(1_500_000, 1_500_000, 2_000_000)
    assert prices.price("other") == Price(100_000, 100_000, 0) and not prices.named("other")
    for text, says in (("models: [1]", "'models' map"), ("models:\n  m: {output: 1}", "models.m"),
                       ("models:\n  m: {input: -1}", "models.m.input"), ("models:\n  m: {input: 0.0000001}",
                                                                         "six decimals"),
                       ("models:\n  m: {input: '1'}", "a number"), ("models:\n  m: {input: 1, extra: 2}", "models.m"),
                       ("models: {", "line")):
        path.write_text(text)
        with pytest.raises(PricesError, match=says.replace(".", r"\.").replace("[", r"\[")):
            load_prices(str(path))


def test_utc_windows_end_at_midnight_and_the_first_of_the_next_month() -> None:
    """Calendar windows, December rolling into January."""
    current = windows(utc(2026, 12, 31, 23, 59, 30))
    assert current["day"].id == "20261231" and current["day"].ends_at == utc(2027, 1, 1)
    assert current["month"].id == "202612" and current["month"].ends_at == utc(2027, 1, 1)
    assert windows(utc(2026, 2, 10))["month"].ends_at == utc(2026, 3, 1)


def test_test_windows_are_short_and_distinct() -> None:
    """BUDGET_TEST_WINDOW_SECONDS: a "day" of that many seconds, a "month" of 30 of them."""
    first, second = windows(100.0, 8.0), windows(104.0, 8.0)
    assert first["day"].ends_at == 104.0 and second["day"].id != first["day"].id
    assert first["month"].ends_at == 240.0 and first["month"].id == second["month"].id


def test_budget_parsing() -> None:
    """Either window may be omitted; bad shapes say what is expected."""
    assert parse_budget({"usd_per_day": 5}) == Budget(usd_per_day=5)
    assert parse_budget({"usd_per_month": 100}).caps() == [("month", 100_000_000_000)]
    assert parse_budget(None) is None and parse_budget({}) is None
    for bad in ({"usd_per_week": 1}, {"usd_per_day": -1}, {"usd_per_day": "5"}, [5], {"usd_per_day": True}):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)


def test_keys_file_budget(tmp_path: Path) -> None:
    """A tenant's `budget` in GATEWAY_KEYS_FILE; a bad one names the tenant entry."""
    path = tmp_path / "keys.yaml"
    path.write_text("tenants:\n  - {name: a, keys: [k1], budget: {usd_per_day: 2.5}}\n")
    (tenant,) = load_keys_file(path, TenantLimits()).values()
    assert tenant.budget == Budget(usd_per_day=2.5)
    path.write_text("tenants:\n  - {name: a, keys: [k1], budget: {usd_per_day: lots}}\n")
    with pytest.raises(AuthConfigError, match=r"tenants\[0\].*usd_per_day"):
        load_keys_file(path, TenantLimits())


def test_worst_case_counts_every_choice_and_the_newer_max_field() -> None:
    """bytes / 4 prompt tokens; max_completion_tokens over max_tokens, times n; 256 without either."""
    assert worst_case_usage(400, {"max_tokens": 10, "n": 3}) == Usage(100, 0, 30)
    assert worst_case_usage(40, {"max_completion_tokens": 7, "max_tokens": 99}) == Usage(10, 0, 7)
    assert worst_case_usage(0, {"max_tokens": True, "n": "2"}) == Usage(0, 0, 256)


def test_budget_headers() -> None:
    """Per window: the cap, what is left (never negative) and the reset in OpenAI's duration form."""
    headers = budget_headers([BudgetState("day", 5_000_000_000, 1_234_567_890, 3600.0),
                              BudgetState("month", 10**11, -5, 0.02)])
    assert headers == {"x-budget-limit-usd-day": "5", "x-budget-remaining-usd-day": "1.234568",
                       "x-budget-reset-day": "1h0m0s", "x-budget-limit-usd-month": "100",
                       "x-budget-remaining-usd-month": "0", "x-budget-reset-month": "20ms"}
    assert usd_text(250_000_000) == "0.25"


def record(**fields: object) -> RequestRecord:
    rec = RequestRecord(request_id="r", method="POST", path="/v1/chat/completions", tenant="t", model="m",
                        status=200)
    for name, value in fields.items():
        setattr(rec, name, value)
    return rec


class Ledger:
    def __init__(self) -> None:
        self.added: list[tuple[str, str, dict[str, int]]] = []

    def add(self, tenant: str, model: str, day: str, counts: dict[str, int]) -> None:
        self.added.append((tenant, model, counts))


PRICES = Prices({"m": Price(input=1_000_000, cached_input=100_000, output=2_000_000)})  # 1 / 0.1 / 2 per million


def test_an_upstream_answer_is_priced_into_the_log_line_and_the_rollup() -> None:
    """cost_usd on the record; the rollup gets tokens and nano-dollars."""
    ledger = Ledger()
    rec = record(upstream_ms=5.0, prompt_tokens=1000, cached_tokens=400, completion_tokens=100, cache="MISS")
    Spend(PRICES, ledger).account(rec)  # type: ignore[arg-type]
    assert rec.cost_nanos == 600_000 + 40_000 + 200_000 and rec.cost_usd == 0.00084
    assert ledger.added == [("t", "m", {"requests": 1, "input_tokens": 1000, "cached_input_tokens": 400,
                                        "output_tokens": 100, "cost_nanos": 840_000})]


def test_a_hit_records_what_the_original_answer_cost() -> None:
    """A cache hit costs nothing and saves the priced usage of the answer it replayed, by layer."""
    ledger = Ledger()
    rec = record(cache="L2", saved_usage=Usage(1000, 0, 100))
    Spend(PRICES, ledger).account(rec)  # type: ignore[arg-type]
    assert rec.cost_usd is None and rec.saved_usd == 0.0012
    assert ledger.added[0][2] == {"requests": 1, "cache_hits": 1, "hits_L2": 1, "saved_tokens": 1100,
                                  "saved_nanos": 1_200_000, "saved_nanos_L2": 1_200_000}


def test_errors_and_unpriced_models_cost_nothing_known() -> None:
    """A refused or failed request is not accounted; an unpriced model is counted without a cost."""
    ledger = Ledger()
    Spend(PRICES, ledger).account(record(status=429))  # type: ignore[arg-type]
    assert ledger.added == []
    rec = record(model="other", upstream_ms=1.0, prompt_tokens=5, completion_tokens=5, cache="MISS")
    Spend(PRICES, ledger).account(rec)  # type: ignore[arg-type]
    assert rec.cost_usd is None and "cost_nanos" not in ledger.added[0][2]


def test_a_fallback_answer_is_priced_at_the_model_that_answered() -> None:
    """After a fallback the cost is the answering model's, rolled up under it; a hit stays the asked model's."""
    ledger = Ledger()
    prices = Prices({"m": Price(1_000_000, 1_000_000, 0), "dear": Price(10_000_000, 10_000_000, 0)})
    rec = record(served_model="dear", upstream_ms=1.0, prompt_tokens=100, completion_tokens=0, cache="MISS")
    Spend(prices, ledger).account(rec)  # type: ignore[arg-type]
    assert rec.cost_usd == 0.001 and ledger.added[0][1] == "dear"
    hit = record(served_model=None, cache="L1", saved_usage=Usage(100, 0, 0))
    Spend(prices, ledger).account(hit)  # type: ignore[arg-type]
    assert hit.saved_usd == 0.0001 and ledger.added[1][1] == "m"
