"""A request's money, once its answer has ended: what it cost upstream or what its cache hit saved.

`account` prices the record (PRICES_FILE), writes the amounts onto it (the log line's `cost_usd`, `saved_usd`),
counts them in the metrics and adds them to the day's rollup (app/spend/ledger.py). Runs in the request's close
steps, before the limiter settles the budget to `cost_nanos`.
"""

from __future__ import annotations

import time
from typing import Any

from app.observability import metrics
from app.spend.ledger import SpendLedger, day_of
from app.spend.prices import Prices, Usage, usd

HIT_LAYERS = ("L0", "L1", "L2")
OTHER_MODEL = "other"  # the metrics' label of a model without a price of its own (keeps label values bounded)


class Spend:
    def __init__(self, prices: Prices, ledger: SpendLedger | None) -> None:
        self.prices = prices
        self.ledger = ledger

    def account(self, rec: Any) -> None:
        """Price an answered request (a 2xx from the upstream or the cache) at the model that answered, and roll it
        up under that model; anything else costs nothing here."""
        if rec.tenant is None or rec.model is None or not 200 <= rec.status < 300:
            return
        # The model that answered: another one than asked for after a fallback (a hit is always the asked one's).
        model = rec.served_model or rec.model if rec.cache not in HIT_LAYERS else rec.model
        price = self.prices.price(model)
        label = model if self.prices.named(model) else OTHER_MODEL
        counts: dict[str, int] = {"requests": 1}
        if rec.cache in HIT_LAYERS:
            counts["cache_hits"] = counts[f"hits_{rec.cache}"] = 1
            saved: Usage | None = rec.saved_usage
            if saved is not None:
                counts["saved_tokens"] = saved.total
                if price is not None:
                    rec.saved_nanos = price.nanos(saved)
                    rec.saved_usd = usd(rec.saved_nanos)
                    counts["saved_nanos"] = counts[f"saved_nanos_{rec.cache}"] = rec.saved_nanos
                    metrics.child(metrics.COST_SAVED, label).inc(rec.saved_usd)
        elif rec.upstream_ms is not None and (rec.prompt_tokens is not None or rec.completion_tokens is not None):
            used = Usage(input=rec.prompt_tokens or 0, cached=rec.cached_tokens or 0, output=rec.completion_tokens or 0)
            counts.update(input_tokens=used.input, cached_input_tokens=min(used.cached, used.input),
                          output_tokens=used.output)
            if price is not None:
                rec.cost_nanos = price.nanos(used)
                rec.cost_usd = usd(rec.cost_nanos)
                counts["cost_nanos"] = rec.cost_nanos
                metrics.child(metrics.COST, label).inc(rec.cost_usd)
        if self.ledger is not None:
            self.ledger.add(rec.tenant, model, day_of(time.time()), counts)
