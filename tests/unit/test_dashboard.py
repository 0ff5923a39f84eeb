"""The Grafana dashboard: valid JSON, PromQL that Prometheus' own parser accepts (promtool),
and only metric names tcpacct exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboards" / "tcpacct-grafana.json"

ISTIO_METRICS = {
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
}
# tcpacct's self-metrics (agent/pipeline.py) that the dashboard may chart.
SELF_METRICS = {
    "tcpacct_unattributed_bytes_total",
    "tcpacct_lifecycle_events_missed_total",
    "tcpacct_poll_duration_seconds",
    "tcpacct_poll_seconds_total",
    "tcpacct_polls_total",
    "tcpacct_poll_errors_total",
    "tcpacct_map_entries",
    "tcpacct_map_capacity",
    "tcpacct_series",
    "tcpacct_backend_info",
    "tcpacct_build_info",
}
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "topk", "rate", "increase", "by", "without", "on",
    "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "label_values",
}
# Grafana's own variables, replaced by a value Prometheus accepts before parsing.
GRAFANA_BUILTINS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def expressions() -> list[tuple[str, str]]:
    """(panel title/refId, PromQL) of every query target."""
    return [(f"{panel['title']}/{target['refId']}", target["expr"])
            for panel in panels() for target in panel["targets"]]


def variables() -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard()["templating"]["list"]}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression.

    ``'sum by (reporter) (rate(istio_tcp_sent_bytes_total{reporter=~"$r"}[5m]))'``
    -> ``{"istio_tcp_sent_bytes_total"}``.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set(re.findall(r"(?<![\w:$])([A-Za-z_:][\w:]*)", text))
    return {name for name in names if name not in PROMQL_WORDS}


def substituted(expr: str) -> str:
    """Grafana variables replaced so Prometheus can parse the query."""
    for name, value in GRAFANA_BUILTINS.items():
        expr = expr.replace(name, value)
    for name in variables():
        expr = expr.replace(f"${name}", ".*")
    return expr


def test_metric_names_are_found_outside_labels_and_functions() -> None:
    expr = ('max by (instance, map) (tcpacct_map_entries{instance=~"$instance"})'
            ' / max by (instance, map) (tcpacct_map_capacity)')
    assert metric_names(expr) == {"tcpacct_map_entries", "tcpacct_map_capacity"}


def test_dashboard_is_json_with_unique_panel_ids_and_a_uid() -> None:
    board = dashboard()
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    assert board["uid"] == "tcpacct-tcp"
    assert len(expressions()) >= 6


def test_queries_name_only_metrics_tcpacct_exports() -> None:
    used = set()
    for where, expr in expressions():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - ISTIO_METRICS - SELF_METRICS
        assert not unknown, f"{where}: {unknown}"
        used |= names
    for variable in variables().values():
        if variable["type"] == "query":
            # label_values(METRIC, LABEL)
            (metric,) = re.findall(r"label_values\(\s*([\w:]+)\s*,", variable["query"]["query"])
            assert metric in ISTIO_METRICS | SELF_METRICS, variable["name"]
    assert used >= ISTIO_METRICS
    assert {"tcpacct_unattributed_bytes_total", "tcpacct_poll_duration_seconds",
            "tcpacct_map_entries"} <= used


def test_every_variable_used_is_defined() -> None:
    for where, expr in expressions():
        leftover = re.findall(r"\$\w+", substituted(expr))
        assert not leftover, f"{where}: undefined {leftover}"


def test_traffic_panels_keep_both_reporters_apart() -> None:
    """A same-node connection is reported by both ends: group by reporter, never add them."""
    reporter = variables()["reporter"]
    assert {option["value"] for option in reporter["options"]} == {"$__all", "source",
                                                                  "destination"}
    for panel in panels():
        for target in panel["targets"]:
            if metric_names(target["expr"]) & ISTIO_METRICS:
                assert re.search(r"sum by \([^)]*\breporter\b", target["expr"]), panel["title"]
                assert "{{reporter}}" in target["legendFormat"], panel["title"]
                assert 'reporter=~"$reporter"' in target["expr"], panel["title"]


def test_every_query_uses_the_datasource_variable() -> None:
    assert variables()["datasource"]["query"] == "prometheus"
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_prometheus_parses_every_query(tmp_path: Path) -> None:
    """Each query as a recording rule through ``promtool check rules`` (Debian's prometheus)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: it comes with Debian's prometheus (make setup)")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": substituted(expr)}
        for i, (_, expr) in enumerate(expressions())
    ]}]}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(expressions())} rules found" in result.stdout


def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    """The check above can fail."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: it comes with Debian's prometheus (make setup)")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"record": "r", "expr": "sum by (reporter (rate(istio_tcp_sent_bytes_total[1m]))"}]}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
