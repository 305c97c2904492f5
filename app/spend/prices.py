"""What a request cost: model prices (PRICES_FILE) applied to the upstream's `usage`.

Money is counted in whole nano-dollars (1e-9 USD) everywhere it is added up (budgets, rollups), so sums are exact
integers in Redis; a price is held as pico-dollars per token (USD per million tokens x 1e6), exact for any price
written with up to six decimals. The log line and the admin API show dollars.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

from app.config import ConfigError, read_yaml_file

NANO_PER_USD = 1_000_000_000
PICO_PER_NANO = 1000
ANY_MODEL = "*"
PRICE_FIELDS = ("input", "cached_input", "output")
# Far above any provider's price: a typo (a price per token instead of per million) is refused at start.
MAX_PRICE_PER_MILLION = Decimal(100_000)


class PricesError(ConfigError):
    """PRICES_FILE is unusable; the message says where."""


@dataclass(frozen=True, slots=True)
class Usage:
    """The upstream's token counts: `input` includes `cached` (the prompt tokens its own prompt cache served)."""

    input: int
    cached: int
    output: int

    @property
    def total(self) -> int:
        return self.input + self.output


@dataclass(frozen=True, slots=True)
class Price:
    """Pico-dollars per token (USD per million tokens x 1e6)."""

    input: int
    cached_input: int
    output: int

    def nanos(self, usage: Usage) -> int:
        """The cost of `usage` in nano-dollars, rounded half up."""
        cached = min(usage.cached, usage.input)
        pico = (usage.input - cached) * self.input + cached * self.cached_input + usage.output * self.output
        return (pico + PICO_PER_NANO // 2) // PICO_PER_NANO


class Prices:
    """Model -> price; a `*` entry prices every model not named."""

    def __init__(self, models: Mapping[str, Price]) -> None:
        self.models = dict(models)
        self._fallback = self.models.get(ANY_MODEL)

    def price(self, model: str | None) -> Price | None:
        if model is None:
            return None
        return self.models.get(model, self._fallback)

    def named(self, model: str) -> bool:
        """Whether the model has a price of its own (metric labels are only these, so they stay bounded)."""
        return model in self.models


def usage_of(raw: Any) -> Usage | None:
    """Token counts from an OpenAI-style `usage` object; None when it has no usable prompt or completion count.

    The prompt tokens the provider's own prompt cache served: DeepSeek's `prompt_cache_hit_tokens`, else OpenAI's
    `prompt_tokens_details.cached_tokens` (DeepSeek sends both, equal).
    """
    if not isinstance(raw, dict):
        return None
    prompt, completion = token_count(raw.get("prompt_tokens")), token_count(raw.get("completion_tokens"))
    if prompt is None and completion is None:
        return None
    cached = token_count(raw.get("prompt_cache_hit_tokens"))
    if cached is None:
        details = raw.get("prompt_tokens_details")
        cached = token_count(details.get("cached_tokens")) if isinstance(details, dict) else None
    prompt = prompt or 0
    return Usage(input=prompt, cached=min(cached or 0, prompt), output=completion or 0)


def token_count(value: Any) -> int | None:
    """A usage figure the accounting can add up; anything else from an odd upstream counts as unknown."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def usd(nanos: int) -> float:
    """Nano-dollars as dollars, for the log line and the admin API."""
    return round(nanos / NANO_PER_USD, 9)


DEFAULT_PRICES = "prices.yaml"


def load_prices(path: str | None) -> Prices:
    """PRICES_FILE, or the shipped default (app/spend/prices.yaml) when unset."""
    if path is None:
        import yaml

        doc = yaml.safe_load(resources.files(__package__).joinpath(DEFAULT_PRICES).read_text("utf-8"))
        where = f"the default prices (app/spend/{DEFAULT_PRICES})"
    else:
        doc = read_yaml_file(Path(path), "PRICES_FILE", PricesError)
        where = f"PRICES_FILE {path}"
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, dict):
        raise PricesError(f"{where}: expected a 'models' map of model -> {{input, cached_input, output}}")
    return Prices({str(name): _price(entry, f"{where}: models.{name}") for name, entry in models.items()})


def _price(entry: Any, where: str) -> Price:
    if not isinstance(entry, dict) or set(entry) - set(PRICE_FIELDS) or "input" not in entry:
        raise PricesError(f"{where}: expected {{input, cached_input, output}} (USD per million tokens; input "
                          "required, cached_input defaults to input, output to 0)")
    values = {name: _per_million(entry.get(name, 0), f"{where}.{name}") for name in PRICE_FIELDS}
    if "cached_input" not in entry:
        values["cached_input"] = values["input"]
    return Price(**values)


def _per_million(value: Any, where: str) -> int:
    """USD per million tokens -> pico-dollars per token, exactly (Decimal of the written number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PricesError(f"{where}: expected a number (USD per million tokens)")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise PricesError(f"{where}: expected a number (USD per million tokens)") from None
    if not amount.is_finite() or not 0 <= amount <= MAX_PRICE_PER_MILLION:
        raise PricesError(f"{where}: expected a price from 0 to {MAX_PRICE_PER_MILLION} USD per million tokens")
    pico = amount * 1_000_000
    if pico != pico.to_integral_value():
        raise PricesError(f"{where}: at most six decimals (a millionth of a dollar per million tokens)")
    return int(pico)
