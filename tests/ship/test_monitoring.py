"""Prometheus config and rules (promtool), adapter rules, Grafana provisioning and dashboard, metric names."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT, load_yaml, require
from .metricnames import adapter_queries, alert_queries, dashboard_queries, deploy_metric_names, names_in

PROM = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool"


def contract_metrics() -> dict[str, str]:
    """name -> type, from the metrics table in docs/CONTRACTS.md."""
    text = (ROOT / "docs" / "CONTRACTS.md").read_text()
    return dict(re.findall(r"^\| `(ollama_guard_[a-z0-9_]+)` \| ([a-z]+)", text, re.M))


def _promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("promtool"), *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd
    )


@pytest.mark.prometheus
def test_promtool_check_config() -> None:
    out = _promtool("check", "config", str(PROM / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout


@pytest.mark.prometheus
def test_promtool_check_rules() -> None:
    out = _promtool("check", "rules", str(PROM / "alerts.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.prometheus
def test_alerts_fire_when_they_should() -> None:
    """promtool unit tests: Redis fallback, error rate, scanner errors, scanner latency."""
    out = _promtool("test", "rules", "alerts_test.yml", cwd=PROMTOOL_TESTS)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alerts_cover_the_required_cases() -> None:
    alerts = {r["alert"] for g in load_yaml(PROM / "alerts.yml")["groups"] for r in g["rules"]}
    assert {
        "OllamaGuardHighErrorRate",
        "OllamaGuardHighLatency",
        "OllamaGuardScannerErrors",
        "OllamaGuardRedisFallback",
    } <= alerts


def test_adapter_rule_serves_the_contract_query_as_the_pods_metric() -> None:
    (rule,) = load_yaml(PROM / "adapter-rules.yaml")["rules"]
    assert rule["name"]["as"] == "ollama_guard_requests_per_second"
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    # With <<.GroupBy>> = namespace,pod this is the contract's
    # sum by (namespace, pod) (rate(ollama_guard_requests_total[1m])).
    query = (
        rule["metricsQuery"]
        .replace("<<.GroupBy>>", "namespace, pod")
        .replace("<<.Series>>", "ollama_guard_requests_total")
    )
    assert (
        query.replace("{<<.LabelMatchers>>}", "") == "sum by (namespace, pod) (rate(ollama_guard_requests_total[1m]))"
    )


def test_adapter_chart_values_carry_the_same_rule() -> None:
    values = load_yaml(PROM / "adapter-values.yaml")
    assert values["rules"]["custom"] == load_yaml(PROM / "adapter-rules.yaml")["rules"]


def test_grafana_provisioning_files_are_valid() -> None:
    (ds,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "ollama-guard.yaml")["providers"]
    assert provider["type"] == "file"
    # docker-compose.yml mounts deploy/grafana/dashboards at the provider's path.
    grafana = load_yaml(ROOT / "docker-compose.yml")["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]


def test_dashboard_is_valid_and_has_the_required_panels() -> None:
    dash = json.loads((GRAFANA / "dashboards" / "ollama-guard.json").read_text())
    assert dash["uid"] == "ollama-guard" and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"  # works with any Prometheus data source uid
        assert panel["targets"], panel["title"]
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for needed in (
        "request rate",
        "latency percentiles",
        "blocks per second by scanner",
        "cache hit rate",
        "replicas per variant",
    ):
        assert needed in titles, needed


def test_queries_balance_their_brackets() -> None:
    for query in [*dashboard_queries(), *alert_queries(), *adapter_queries()]:
        for opening, closing in ("()", "{}", "[]"):
            assert query.count(opening) == query.count(closing), query


def test_every_metric_used_is_in_the_contract() -> None:
    contract = contract_metrics()
    assert len(contract) >= 19
    used = deploy_metric_names()
    assert used, "no metric names found"
    assert used <= set(contract), sorted(used - set(contract))


def test_histograms_are_queried_through_their_buckets() -> None:
    contract = contract_metrics()
    for query in [*dashboard_queries(), *alert_queries()]:
        if "histogram_quantile" in query:
            for name in names_in([query]):
                assert contract[name] == "histogram"
                assert f"{name}_bucket" in query


def test_core_metrics_are_all_on_the_dashboard() -> None:
    on_dashboard = names_in(dashboard_queries())
    assert {
        "ollama_guard_requests_total",
        "ollama_guard_request_duration_seconds",
        "ollama_guard_scanner_blocks_total",
        "ollama_guard_cache_requests_total",
        "ollama_guard_device_info",
    } <= on_dashboard


def test_every_metric_used_is_declared_by_the_proxy_with_the_contract_type() -> None:
    """The proxy's own registry (no server, no llm-guard import) exports each queried metric."""
    from ollama_guard.metrics import Metrics
    from prometheus_client import generate_latest

    metrics = Metrics()
    assert metrics.registry is not None, "PROMETHEUS_MULTIPROC_DIR is set in the test environment"
    exported = dict(re.findall(r"^# TYPE (ollama_guard_\S+) (\S+)$", generate_latest(metrics.registry).decode(), re.M))
    contract = contract_metrics()
    for name in deploy_metric_names():
        assert exported.get(name) == contract[name], f"{name}: proxy exports {exported.get(name)}"
