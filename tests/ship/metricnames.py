"""Every ``ollama_guard_*`` metric the deploy files use: the dashboard, the alert rules, the adapter rules.

The lead's integration test compares :func:`deploy_metric_names` with a running proxy's ``/metrics``;
tests/ship/test_monitoring.py compares it with the table in docs/CONTRACTS.md.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterable, Iterator
from typing import Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "ollama-guard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ADAPTER_RULES = ROOT / "deploy" / "prometheus" / "adapter-rules.yaml"

_NAME = re.compile(r"\bollama_guard_[a-z0-9_]*[a-z0-9]")
# Series a histogram exports besides its base name.
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def base_name(series: str) -> str:
    """``ollama_guard_x_seconds_bucket`` -> ``ollama_guard_x_seconds``: the name a metric is declared by."""
    for suffix in _HISTOGRAM_SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if t.get("expr")]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and isinstance(query, str):
            queries.append(query)
    return queries


def alert_queries() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def adapter_queries() -> list[str]:
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    # The adapter's own output name (`as`) is a custom-metrics API name, not a Prometheus series.
    return [
        s
        for rule in rules
        for key in ("seriesQuery", "metricsQuery", "name")
        for s in _strings(rule.get(key, {}) if key == "name" else rule.get(key, ""))
        if not (key == "name" and s == rule["name"].get("as"))
    ]


def names_in(queries: Iterable[str]) -> set[str]:
    return {base_name(m) for q in queries for m in _NAME.findall(q)}


def deploy_metric_names() -> set[str]:
    """Every ``ollama_guard_*`` metric (base names: histograms without ``_bucket``) the deploy files query."""
    return names_in([*dashboard_queries(), *alert_queries(), *adapter_queries()])


if __name__ == "__main__":
    print("\n".join(sorted(deploy_metric_names())))
