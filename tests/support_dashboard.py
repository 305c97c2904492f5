"""Metric names the Grafana dashboard queries, and the names a `/metrics` page exposes, in one spelling.

Plain functions (no pytest) so unit tests and the end-to-end check against a live `/metrics` share them:
    from support_dashboard import dashboard_metric_names, exposition_metric_names
(`tests/` is on sys.path through tests/conftest.py.) Names are spelled as in the contract: counters keep their
`_total`, histograms are named without `_bucket`/`_sum`/`_count`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_PATH = REPO_ROOT / "deploy" / "grafana-dashboard.json"

# The metric families the gateway exports (the contract); the dashboard may query only these.
CONTRACT_METRIC_NAMES: frozenset[str] = frozenset({
    "gateway_requests_total",
    "gateway_request_duration_seconds",
    "gateway_upstream_duration_seconds",
    "gateway_upstream_retries_total",
    "gateway_cache_lookups_total",
    "gateway_semantic_similarity",
    "gateway_embedding_duration_seconds",
    "gateway_tokens_total",
    "gateway_tokens_saved_total",
    "gateway_ratelimited_total",
    "gateway_upstream_key_state",
})

_METRIC_RE = re.compile(r"\bgateway_[a-z0-9_]*[a-z0-9]")
# Series suffixes a histogram (`_bucket`, `_sum`, `_count`) or a counter (`_created`) adds to its family name.
# `_total` is not stripped: it is part of a counter's name in the contract and on a /metrics page.
_SERIES_SUFFIXES = ("_bucket", "_sum", "_count", "_created")


def family_name(series: str) -> str:
    """The family a series name belongs to: `x_seconds_bucket` -> `x_seconds`; `x_total` stays."""
    for suffix in _SERIES_SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows nest their panels


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL text in the dashboard: panel targets and query variables."""
    queries = [
        target["expr"]
        for panel in _panels(dashboard.get("panels", []))
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        queries.append(query.get("query", "") if isinstance(query, dict) else str(query or ""))
        queries.append(str(variable.get("definition", "")))
    return queries


def dashboard_metric_names(path: Path | str = DASHBOARD_PATH) -> set[str]:
    """Metric family names the dashboard at `path` queries, spelled as in the contract."""
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    return {family_name(m) for query in dashboard_queries(dashboard) for m in _METRIC_RE.findall(query)}


def exposition_metric_names(text: str) -> set[str]:
    """`gateway_*` family names on a Prometheus text page (what `GET /metrics` returns), as in the contract.

    Read from the `# TYPE` lines, which prometheus_client writes with `_total` for counters and the bare
    family name for histograms and gauges, so a family counts even before its first sample.
    """
    names = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[:2] == ["#", "TYPE"] and parts[2].startswith("gateway_"):
            names.add(parts[2])
    return names
