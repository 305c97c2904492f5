"""The Grafana dashboard parses, imports cleanly and queries only metrics the gateway exports."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def _support() -> ModuleType:
    """tests/support_dashboard.py, whether or not tests/ is on sys.path (tests/conftest.py puts it there)."""
    if "support_dashboard" in sys.modules:
        return sys.modules["support_dashboard"]
    path = Path(__file__).resolve().parents[1] / "support_dashboard.py"
    spec = importlib.util.spec_from_file_location("support_dashboard", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["support_dashboard"] = module
    spec.loader.exec_module(module)
    return module


support = _support()
dashboard_metric_names = support.dashboard_metric_names
DASHBOARD_PATH: Path = support.DASHBOARD_PATH
CONTRACT_METRIC_NAMES: frozenset[str] = support.CONTRACT_METRIC_NAMES


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))


def _all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_all_panels(panel.get("panels", [])))
    return out


def test_dashboard_is_importable_with_a_prometheus_input(dashboard: dict[str, Any]) -> None:
    """The dashboard declares a DS_PROMETHEUS input and a schema version Grafana 10/11 reads."""
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"


def test_every_query_uses_the_prometheus_input(dashboard: dict[str, Any]) -> None:
    """Each panel and target reads from ${DS_PROMETHEUS}, so importing binds them all to one data source."""
    for panel in _all_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_panels_have_unique_ids_and_fit_the_grid(dashboard: dict[str, Any]) -> None:
    """Panel ids are unique and every panel lies within Grafana's 24-column grid."""
    panels = _all_panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, p["title"]


def test_dashboard_queries_only_contract_metrics() -> None:
    """Every metric a panel queries is one the gateway exports (names from the contract)."""
    names = dashboard_metric_names(DASHBOARD_PATH)
    assert names, "no gateway_* metric found in the dashboard"
    assert names <= CONTRACT_METRIC_NAMES, f"not in the contract: {sorted(names - CONTRACT_METRIC_NAMES)}"


def test_dashboard_covers_every_contract_metric() -> None:
    """Every exported metric appears on some panel."""
    missing = CONTRACT_METRIC_NAMES - dashboard_metric_names(DASHBOARD_PATH)
    assert not missing, f"no panel for {sorted(missing)}"


def test_quantiles_are_computed_from_buckets_by_le(dashboard: dict[str, Any]) -> None:
    """histogram_quantile is applied to rate(..._bucket) aggregated by `le` (anything else is meaningless)."""
    exprs = [t["expr"] for p in _all_panels(dashboard["panels"]) for t in p.get("targets", [])]
    quantile_exprs = [e for e in exprs if "histogram_quantile" in e]
    assert quantile_exprs
    for expr in quantile_exprs:
        assert re.search(r"sum by \(le\b[^)]*\) \(rate\(gateway_[a-z_]+_bucket\b", expr), expr


def test_latency_by_cache_layer_uses_the_cache_label(dashboard: dict[str, Any]) -> None:
    """Request latency p50/p95/p99 is split by the `cache` label of gateway_request_duration_seconds."""
    exprs = [t["expr"] for p in _all_panels(dashboard["panels"]) for t in p.get("targets", [])]
    latency = [e for e in exprs if "gateway_request_duration_seconds_bucket" in e]
    assert {re.search(r"histogram_quantile\((0\.\d+)", e).group(1) for e in latency} >= {"0.5", "0.95", "0.99"}
    assert all("by (le, cache)" in e for e in latency)


def test_metric_name_extraction_normalises_series_suffixes(tmp_path: Path) -> None:
    """Histogram series map to their family, counters keep `_total`, nested row panels are searched."""
    doc = {
        "panels": [
            {"type": "timeseries", "targets": [
                {"expr": "histogram_quantile(0.9, sum by (le) (rate(gateway_x_seconds_bucket[5m])))"},
                {"expr": "rate(gateway_x_seconds_sum[5m]) / rate(gateway_x_seconds_count[5m])"},
            ]},
            {"type": "row", "collapsed": True, "panels": [
                {"type": "stat", "targets": [{"expr": 'sum(rate(gateway_hits_total{layer="L1"}[1m]))'}]},
            ]},
        ],
        "templating": {"list": [
            {"type": "query", "query": {"query": "label_values(gateway_y_total, route)"}},
            {"type": "custom", "query": "gateway_not_a_query"},
        ]},
    }
    path = tmp_path / "d.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    assert dashboard_metric_names(path) == {"gateway_x_seconds", "gateway_hits_total", "gateway_y_total"}


def test_exposition_names_match_the_dashboard_spelling() -> None:
    """A prometheus_client /metrics page yields the same spelling the dashboard helper uses."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    class Fixed:
        def collect(self) -> list[object]:
            return [
                CounterMetricFamily("gateway_requests", "r", value=1),
                HistogramMetricFamily("gateway_request_duration_seconds", "d", buckets=[("1", 1), ("+Inf", 1)],
                                      sum_value=0.5),
                GaugeMetricFamily("gateway_upstream_key_state", "k", value=0),
                CounterMetricFamily("other_total", "o", value=1),
            ]

    registry = CollectorRegistry()
    registry.register(Fixed())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert support.exposition_metric_names(text) == {
        "gateway_requests_total", "gateway_request_duration_seconds", "gateway_upstream_key_state",
    }
