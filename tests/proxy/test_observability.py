"""Metrics after a known sequence of requests, a real Prometheus scraping the proxy, audit logs."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import free_port, wait_for
from .policies import BANNED_IN, pure

pytestmark = pytest.mark.slow


def samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m, name, **labels):
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def chat(url, text):
    return httpx.post(
        url + "/api/chat",
        json={"model": "m", "stream": False, "messages": [{"role": "user", "content": text}]},
    )


def test_metrics_after_a_known_sequence(start_proxy):
    p = start_proxy(**pure(rate_limit={"enabled": True, "per_minute": 1, "burst": 2, "backend": "memory"}))
    assert chat(p.url, "hello metrics").status_code == 200
    assert chat(p.url, BANNED_IN).status_code == 403
    assert chat(p.url, "third").status_code == 429
    m = samples(p.url)
    base = {"route": "/api/chat", "dialect": "ollama"}
    assert value(m, "ollama_guard_requests_total", **base, status="200", decision="allowed") == 1
    assert value(m, "ollama_guard_requests_total", **base, status="403", decision="blocked") == 1
    assert value(m, "ollama_guard_requests_total", **base, status="429", decision="rate_limited") == 1
    assert value(m, "ollama_guard_scanner_blocks_total", scanner="BanSubstrings", direction="input") == 1
    assert value(m, "ollama_guard_rate_limited_total", client="anonymous") == 1
    assert value(m, "ollama_guard_request_duration_seconds_count", **base) == 3
    assert value(m, "ollama_guard_scanner_duration_seconds_count", scanner="Secrets", direction="input") == 2
    assert value(m, "ollama_guard_cache_requests_total", backend="memory", result="miss") == 3  # 2 in, 1 out
    assert value(m, "ollama_guard_upstream_duration_seconds_count", route="/api/chat") == 1
    assert value(m, "ollama_guard_device_info", device="cpu") == 1
    assert value(m, "ollama_guard_scanner_ready", scanner="Secrets", direction="output") == 1
    assert value(m, "ollama_guard_cache_backend_active", backend="memory") == 1
    assert value(m, "ollama_guard_requests_in_flight") == 1  # the scrape itself
    assert value(m, "ollama_guard_process_resident_memory_bytes") > 10_000_000


def test_upstream_down_and_stopped_streams_are_counted(start_proxy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    p = start_proxy(**pure(ollama_url=dead))
    assert chat(p.url, "anyone there").status_code == 502
    m = samples(p.url)
    assert value(m, "ollama_guard_upstream_errors_total", kind="connect") == 1
    assert (
        value(
            m,
            "ollama_guard_requests_total",
            route="/api/chat",
            dialect="ollama",
            status="502",
            decision="error",
        )
        == 1
    )
    q = start_proxy(**pure())
    from .policies import BANNED_OUT

    httpx.post(q.url + "/api/generate", json={"model": "m", "prompt": f"REPLY: fine words then {BANNED_OUT}"})
    assert value(samples(q.url), "ollama_guard_streams_stopped_total", dialect="ollama", scanner="BanSubstrings") == 1


def test_audit_record_without_raw_prompt(start_proxy, caplog):
    p = start_proxy(**pure())
    secret_prompt = "my very private question 42"
    with caplog.at_level(logging.INFO, logger="ollama_guard.audit"):
        r = httpx.post(
            p.url + "/api/chat",
            headers={"X-Request-ID": "rid-77"},
            json={"model": "m", "stream": False, "messages": [{"role": "user", "content": secret_prompt}]},
        )
        assert r.status_code == 200
        wait_for(lambda: any(getattr(rec, "audit", None) for rec in caplog.records), 5, "audit record")
    rec = next(r for r in caplog.records if getattr(r, "audit", None))
    audit = rec.audit
    assert audit["who"] == "127.0.0.1" and audit["model"] == "m" and audit["decision"] == "allowed"
    assert audit["route"] == "/api/chat" and "input:Secrets" in audit["scan_ms"]
    assert rec.request_id == "rid-77"
    from ollama_guard.logs import JsonFormatter

    line = JsonFormatter().format(rec)
    assert secret_prompt not in line and '"request_id":"rid-77"' in line


@pytest.mark.prometheus
def test_prometheus_rate_query_matches_generated_load(start_proxy, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    p = start_proxy(**pure())
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: ollama-guard
    static_configs: [{{targets: ["127.0.0.1:{p.port}"]}}]
""")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api/v1/query"
    query = 'sum(rate(ollama_guard_requests_total{route="/api/chat"}[8s]))'
    try:

        def scraped():
            try:
                r = httpx.get(api, params={"query": "up"}, timeout=2)
            except httpx.HTTPError:
                return False
            if r.status_code != 200:  # still starting: "Service Unavailable"
                return False
            res = r.json()["data"]["result"]
            return bool(res) and res[0]["value"][1] == "1"

        wait_for(scraped, 60, "prometheus scraping the proxy")
        # A bounded, paced load: 25 requests/s for 12 s.
        rate, seconds = 25.0, 12.0
        started = time.monotonic()
        sent = 0
        with httpx.Client(base_url=p.url) as c:
            while time.monotonic() - started < seconds:
                c.post(
                    "/api/chat",
                    json={
                        "model": "m",
                        "stream": False,
                        "messages": [{"role": "user", "content": f"load {sent % 10}"}],
                    },
                )
                sent += 1
                next_at = started + sent / rate
                time.sleep(max(0.0, next_at - time.monotonic()))
        generated = sent / (time.monotonic() - started)
        result = httpx.get(api, params={"query": query}).json()["data"]["result"]
        measured = float(result[0]["value"][1])
        assert abs(measured - generated) <= 0.2 * generated, (measured, generated)
    finally:
        proc.terminate()
        proc.wait(10)


def test_deploy_dashboards_alerts_and_adapter_name_metrics_the_running_proxy_exports(start_proxy):
    import importlib.util
    import re
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "metricnames", Path(__file__).resolve().parents[1] / "ship" / "metricnames.py"
    )
    metricnames = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(metricnames)
    p = start_proxy(**pure())
    text = httpx.get(p.url + "/metrics").text
    # Declared families (# TYPE), so labelled metrics with no sample yet count too.
    exported = set(re.findall(r"^# TYPE (ollama_guard_\w+) ", text, re.M))
    exported |= {n[: -len("_total")] for n in exported if n.endswith("_total")}
    used = metricnames.deploy_metric_names()
    assert used, "the deploy files name no metric"
    missing = {n for n in used if n not in exported and n.removesuffix("_total") not in exported}
    assert not missing, f"deploy files use metrics the proxy does not export: {sorted(missing)}"


def test_metrics_are_correct_with_several_workers(upstream, tmp_path):
    import os
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "OLLAMA_URL": upstream.url, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ollama_guard.cli", "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready():
            try:
                return httpx.get(url + "/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 90, "two workers")
        n = 30
        for i in range(n):  # new connections: the kernel spreads them over both workers
            assert (
                httpx.post(
                    url + "/api/generate",
                    json={"model": "m", "stream": False, "prompt": f"p{i}"},
                    headers={"Connection": "close"},
                ).status_code
                == 200
            )

        def counted() -> float:
            return value(
                samples(url),
                "ollama_guard_requests_total",
                route="/api/generate",
                dialect="ollama",
                status="200",
                decision="allowed",
            )

        # Each worker writes its counts to its file within a second (metrics.FLUSH_SECONDS).
        wait_for(lambda: counted() == n, 30, f"{n} requests counted across both workers")
        for _ in range(4):  # whichever worker answers the scrape, it reports the whole pod
            assert counted() == n
    finally:
        proc.terminate()
        proc.wait(20)


def test_streamed_answers_get_an_audit_record_when_they_end(start_proxy, caplog):
    from .policies import AWS, BANNED_OUT

    p = start_proxy(**pure())
    with caplog.at_level(logging.INFO, logger="ollama_guard.audit"):
        httpx.post(
            p.url + "/api/chat",
            json={
                "model": "m",
                "messages": [
                    {"role": "user", "content": f"REPLY: the key is {AWS} and that is all there is to say about it."}
                ],
            },
        )
        httpx.post(p.url + "/api/generate", json={"model": "m", "prompt": f"REPLY: fine words, then {BANNED_OUT}"})

        def records():
            return [r.audit for r in caplog.records if getattr(r, "audit", None) and r.audit["stream"]]

        wait_for(lambda: len(records()) == 2, 5, "two stream audit records")
    sanitized, stopped = sorted(records(), key=lambda a: a["route"])
    assert sanitized["route"] == "/api/chat" and sanitized["decision"] == "sanitized"
    assert "Secrets" in sanitized["fired"] and sanitized["scan_ms"]["output:Secrets"] > 0
    assert stopped["route"] == "/api/generate" and stopped["decision"] == "blocked"
    assert stopped["stream_stopped"] is True and stopped["scores"]["output:BanSubstrings"] == 1.0


def test_deferred_counts_export_as_prometheus_client_would():
    """With several workers the request path's counts are kept in memory and flushed to the metric files
    (metrics._Deferred*): once flushed, the export is what prometheus-client's own inc/observe would give,
    an observation on a bucket's bound included."""
    from ollama_guard.metrics import LATENCY_BUCKETS, _Deferred, _DeferredHistogram
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    direct_h = Histogram("direct_seconds", "d", ["route"], buckets=LATENCY_BUCKETS, registry=reg)
    kept_h = Histogram("kept_seconds", "k", ["route"], buckets=LATENCY_BUCKETS, registry=reg)
    direct_c = Counter("direct", "d", registry=reg)
    kept_c = Counter("kept", "k", registry=reg)
    direct_g = Gauge("direct_now", "d", registry=reg)
    kept_g = Gauge("kept_now", "k", registry=reg)
    h, c, g = _DeferredHistogram(kept_h.labels("/api/chat")), _Deferred(kept_c), _Deferred(kept_g)

    def exported(prefix: str) -> dict[tuple[str, tuple], float]:
        return {
            (smp.name.replace(prefix, "", 1), tuple(sorted(smp.labels.items()))): smp.value
            for metric in reg.collect()
            for smp in metric.samples
            if smp.name.startswith(prefix) and not smp.name.endswith("_created")
        }

    for batch in ([0.0, 0.0004, 0.0005, 0.003, 0.005, 1, 121.0], [], [0.0025, 60, 1e9]):
        for v in batch:
            direct_h.labels("/api/chat").observe(v)
            h.observe(v)
            direct_c.inc(2)
            c.inc(2)
            direct_g.inc()
            g.inc()
        direct_g.dec(3)
        g.dec(3)
        assert exported("kept") != exported("direct") or not batch  # kept until the flush
        h.flush()
        c.flush()
        g.flush()
        # The same counts; the sum the same up to the order its floats were added in.
        assert exported("kept") == pytest.approx(exported("direct"), rel=1e-12)


def test_a_failed_metrics_flush_is_logged_and_the_flushing_goes_on(caplog):
    import asyncio

    from ollama_guard.metrics import Metrics

    metrics = Metrics()
    flushes: list[int] = []
    second = asyncio.Event()

    def flush() -> None:
        flushes.append(1)
        if len(flushes) == 1:
            raise OSError("the metrics directory is gone")
        second.set()

    metrics.flush = flush  # type: ignore[method-assign]

    async def two_flushes() -> None:
        task = asyncio.create_task(metrics.flush_every(0.001))
        try:
            await second.wait()
        finally:
            task.cancel()

    with caplog.at_level(logging.ERROR, logger="ollama_guard.metrics"):
        asyncio.run(asyncio.wait_for(two_flushes(), 30))
    assert any("PROMETHEUS_MULTIPROC_DIR failed" in r.getMessage() for r in caplog.records)
