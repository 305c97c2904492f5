"""Tenant budgets in dollars per UTC day and per UTC calendar month, and their windows.

Enforcement is the rate limiter's (app/ratelimit/lua/acquire.lua, kind "b"): the request's worst-case cost is
reserved in the same EVALSHA as its rate limits, and settled to the real cost when the answer ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from app.spend.prices import NANO_PER_USD

# A test-only "month" is this many test "days" (BUDGET_TEST_WINDOW_SECONDS).
TEST_MONTH_WINDOWS = 30
MAX_USD = 1e9  # far above any real budget; keeps nano-dollars exact in the Lua script's doubles


@dataclass(frozen=True)
class Budget:
    """USD a tenant may spend per UTC day and per UTC calendar month; None: no cap on that window."""

    usd_per_day: float | None = None
    usd_per_month: float | None = None

    def caps(self) -> list[tuple[str, int]]:
        """(window, nano-dollars) of each window that has a cap."""
        return [(window, round(usd * NANO_PER_USD)) for window, usd in
                (("day", self.usd_per_day), ("month", self.usd_per_month)) if usd is not None]

    def view(self) -> dict[str, float | None]:
        return {"usd_per_day": self.usd_per_day, "usd_per_month": self.usd_per_month}


def parse_budget(value: Any) -> Budget | None:
    """`{usd_per_day?, usd_per_month?}` (non-negative numbers) -> Budget; None for null or `{}`.

    ValueError says what is wrong (the keys file and the admin API wrap it with where).
    """
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"usd_per_day", "usd_per_month"}:
        raise ValueError("`budget` is an object with usd_per_day and/or usd_per_month (US dollars), or null")
    for name, amount in value.items():
        if amount is not None and (isinstance(amount, bool) or not isinstance(amount, int | float)
                                   or not 0 <= amount <= MAX_USD or not math.isfinite(amount)):
            raise ValueError(f"`budget.{name}` is a number of US dollars from 0 to {MAX_USD:.0f}, or null")
    budget = Budget(usd_per_day=value.get("usd_per_day"), usd_per_month=value.get("usd_per_month"))
    return budget if budget.caps() else None


@dataclass(frozen=True)
class Window:
    """One budget window: its name, an id that names its Redis counter, and when it ends (unix seconds)."""

    name: str
    id: str
    ends_at: float


def windows(now: float, test_seconds: float | None = None) -> dict[str, Window]:
    """The day and month windows `now` falls in: UTC calendar ones, or short test ones when `test_seconds` is set."""
    if test_seconds:
        day = math.floor(now / test_seconds)
        month = math.floor(now / (test_seconds * TEST_MONTH_WINDOWS))
        return {
            "day": Window("day", f"t{test_seconds:g}-{day}", (day + 1) * test_seconds),
            "month": Window("month", f"t{test_seconds:g}-m{month}", (month + 1) * test_seconds * TEST_MONTH_WINDOWS),
        }
    at = datetime.fromtimestamp(now, UTC)
    day_start = datetime(at.year, at.month, at.day, tzinfo=UTC).timestamp()
    next_month = datetime(at.year + at.month // 12, at.month % 12 + 1, 1, tzinfo=UTC)
    return {
        "day": Window("day", at.strftime("%Y%m%d"), day_start + 86400),
        "month": Window("month", at.strftime("%Y%m"), next_month.timestamp()),
    }


def usd_text(nanos: int) -> str:
    """Dollars with up to six decimals, no trailing zeros: `5`, `0.25`, `0.000123`."""
    return f"{nanos / NANO_PER_USD:.6f}".rstrip("0").rstrip(".")
