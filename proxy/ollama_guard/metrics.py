"""Prometheus metrics (names fixed in docs/CONTRACTS.md).

The request path's counts (`Metrics.child`, `in_flight_count`) are kept in plain numbers and handed to
prometheus-client by `Metrics.flush`, before every scrape (`render`): prometheus-client takes a lock on each
`inc` and `observe`, and in multiprocess mode writes a memory-mapped file too (nine a cache hit: 4 % of its CPU
in one process, 9 % with several workers). Record and flush on the event loop's thread only.

With several uvicorn workers each process writes to PROMETHEUS_MULTIPROC_DIR and /metrics aggregates them
(prometheus-client's multiprocess mode), so a scrape of any worker sees the whole pod. There each worker also
flushes every FLUSH_SECONDS: a scrape answered by another worker may miss the last second of its counts.
"""

from __future__ import annotations

import asyncio
import logging
import os
from bisect import bisect_left
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)
SCAN_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


FLUSH_SECONDS = 1.0  # multiprocess mode: how long a worker may keep counts before they are in its file


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _Deferred:
    """A counter's or gauge's increments, kept until `flush`."""

    __slots__ = ("target", "amount")

    def __init__(self, target: Any) -> None:
        self.target = target
        self.amount = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.amount += amount

    def dec(self, amount: float = 1.0) -> None:
        self.amount -= amount

    def flush(self) -> None:
        if self.amount:
            amount, self.amount = self.amount, 0.0
            self.target.inc(amount)  # a gauge's may be negative; a counter's never is


class _DeferredHistogram:
    """A histogram's observations, counted per bucket until `flush`, then written as
    prometheus-client's `observe` would have: an observation counts in the first bucket whose upper bound is
    at least its value. Writes to the child's `_buckets` and `_sum` values (prometheus-client pinned in
    constraints.txt; tests/proxy/test_observability.py compares the two)."""

    __slots__ = ("target", "bounds", "counts", "total")

    def __init__(self, target: Any) -> None:
        self.target = target
        self.bounds: list[float] = list(target._upper_bounds)  # the last is +Inf
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.total += amount

    def flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        self.counts = [0] * len(counts)
        total, self.total = self.total, 0.0
        for bucket, n in zip(self.target._buckets, counts, strict=True):
            if n:
                bucket.inc(n)
        self.target._sum.inc(total)


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        # In multiprocess mode metrics live in the default registry's files; otherwise in our own registry
        # so that several apps in one process (tests) don't collide.
        reg = None if self.multiprocess else CollectorRegistry()
        kw: dict[str, Any] = {"registry": reg} if reg is not None else {}
        self.registry = reg
        gauge_mode: dict[str, Any] = {"multiprocess_mode": "livesum"} if self.multiprocess else {}
        gauge_max: dict[str, Any] = {"multiprocess_mode": "max"} if self.multiprocess else {}
        p = "ollama_guard_"
        self.requests = Counter(
            p + "requests_total",
            "Requests by route, dialect, status and guard decision",
            ["route", "dialect", "status", "decision"],
            **kw,
        )
        self.request_seconds = Histogram(
            p + "request_duration_seconds",
            "Whole request latency",
            ["route", "dialect"],
            buckets=LATENCY_BUCKETS,
            **kw,
        )
        self.upstream_seconds = Histogram(
            p + "upstream_duration_seconds",
            "Time to Ollama's response headers",
            ["route"],
            buckets=LATENCY_BUCKETS,
            **kw,
        )
        self.upstream_errors = Counter(p + "upstream_errors_total", "Failed calls to Ollama", ["kind"], **kw)
        self.scanner_seconds = Histogram(
            p + "scanner_duration_seconds",
            "Per-scanner latency",
            ["scanner", "direction"],
            buckets=SCAN_BUCKETS,
            **kw,
        )
        self.scanner_blocks = Counter(
            p + "scanner_blocks_total", "Texts a scanner blocked", ["scanner", "direction"], **kw
        )
        self.scanner_errors = Counter(
            p + "scanner_errors_total", "Scanner errors and timeouts", ["scanner", "direction"], **kw
        )
        self.cache_requests = Counter(p + "cache_requests_total", "Verdict cache lookups", ["backend", "result"], **kw)
        self.cache_backend_active = Gauge(
            p + "cache_backend_active",
            "1 for the verdict cache backend in use",
            ["backend"],
            **kw,
            **gauge_max,
        )
        self.redis_errors = Counter(p + "redis_errors_total", "Failed Redis calls", **kw)
        self.rate_limited = Counter(p + "rate_limited_total", "Requests refused by rate limits", ["client"], **kw)
        self.in_flight = Gauge(p + "requests_in_flight", "Requests being served", **kw, **gauge_mode)
        self.streams_stopped = Counter(
            p + "streams_stopped_total", "Streams the guard stopped", ["dialect", "scanner"], **kw
        )
        self.model_load = Gauge(p + "model_load_seconds", "Scanner load time", ["scanner"], **kw, **gauge_max)
        self.scanner_ready = Gauge(
            p + "scanner_ready", "1 when the scanner is loaded", ["scanner", "direction"], **kw, **gauge_max
        )
        self.device_info = Gauge(p + "device_info", "Compute device in use", ["device"], **kw, **gauge_max)
        self.rss = Gauge(p + "process_resident_memory_bytes", "Resident memory", **kw, **gauge_mode)
        self.cpu = Gauge(p + "process_cpu_percent", "CPU use of this process", **kw, **gauge_mode)
        self.gpu_memory = Gauge(p + "gpu_memory_bytes", "GPU memory allocated", ["device"], **kw, **gauge_mode)
        self._process: Any = None
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._deferred: list[_Deferred | _DeferredHistogram] = []
        self.in_flight_count = _Deferred(self.in_flight)  # what the gate counts requests in flight with
        self._deferred.append(self.in_flight_count)

    def child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, looked up once per label set: prometheus-client's `labels` checks its
        arguments and takes a lock on every call (~2 % of a cache hit's CPU for the request path's four).
        Every label set here is bounded (routes, dialects, statuses, decisions, scanner names). Its `inc` and
        `observe` are kept until `flush`."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            target = metric.labels(*values)
            found = _DeferredHistogram(target) if isinstance(metric, Histogram) else _Deferred(target)
            self._deferred.append(found)
            self._children[key] = found
        return found

    def flush(self) -> None:
        """Hand the counts kept since the last flush to prometheus-client (multiprocess: this worker's file)."""
        for deferred in self._deferred:
            deferred.flush()

    async def flush_every(self, seconds: float = FLUSH_SECONDS) -> None:
        """`flush` every `seconds`, for as long as the app runs (multiprocess mode; started by its lifespan). A
        flush that fails (the metrics directory gone) is logged, and the next one runs as usual."""
        while True:
            await asyncio.sleep(seconds)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a metrics fault must not end the flushing
                log.exception("writing metrics to PROMETHEUS_MULTIPROC_DIR failed")

    # -- recorded by the engine, the cache and the app ------------------------------------------------
    def scanner_children(self, scanner: str, direction: str) -> tuple[Any, Any, Any]:
        """One scanner's children in one direction: (`scanner_seconds`, `scanner_errors`, `scanner_blocks`), as
        `child` gives them (app._Observer keeps them per scanner)."""
        return (
            self.child(self.scanner_seconds, scanner, direction),
            self.child(self.scanner_errors, scanner, direction),
            self.child(self.scanner_blocks, scanner, direction),
        )

    def cache_lookup(self, backend: str, hits: int, misses: int) -> None:
        if hits:
            self.child(self.cache_requests, backend, "hit").inc(hits)
        if misses:
            self.child(self.cache_requests, backend, "miss").inc(misses)

    def cache_backend(self, backend: str) -> None:
        for b in ("redis", "memory"):
            self.cache_backend_active.labels(b).set(1 if b == backend else 0)

    def redis_error(self) -> None:
        self.redis_errors.inc()

    def policy_loaded(self, policy: Any) -> None:
        for s in policy.all():
            self.scanner_ready.labels(s.name, s.direction).set(1 if s.loaded else 0)
            if s.loaded and s.is_model:
                self.model_load.labels(s.name).set(s.load_seconds)
        device = policy.device.name if policy.device else "cpu"
        self.device_info.labels(device).set(1)

    def sample_process(self, device: str) -> None:
        import psutil

        if self._process is None:
            self._process = psutil.Process()
            self._process.cpu_percent(None)
        self.rss.set(self._process.memory_info().rss)
        self.cpu.set(self._process.cpu_percent(None))
        if device == "cuda":
            import torch

            self.gpu_memory.labels("cuda").set(torch.cuda.memory_allocated())
        elif device == "mps":
            import torch

            self.gpu_memory.labels("mps").set(torch.mps.current_allocated_memory())

    def render(self) -> tuple[bytes, str]:
        self.flush()
        if self.multiprocess:
            from prometheus_client import multiprocess

            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg)
            return generate_latest(reg), CONTENT_TYPE_LATEST
        assert self.registry is not None
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
