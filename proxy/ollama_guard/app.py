"""The app factory: `create_app(settings)` builds the proxy; its lifespan owns every long-lived thing.

The request path, one module per stage (see docs/ARCHITECTURE.md):
  gate.py         every request: request id, security headers, IP filter, API key, rate limit, metrics label
  pipeline.py     guarded routes: body -> Ollama's reading (mediation.py) -> input scan -> forward what was
                  scanned -> output scan (whole, or relay.py while streaming) -> respond; the error boundary
  passthrough.py  the read-only routes Ollama answers as it is, and model management when allowed
  ops.py          /health, /ready, /metrics, /stats, and 404 for the rest
  admin.py        /admin/* behind the admin token
  responses.py    answers in the caller's dialect, streaming responses
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from . import __version__
from .admin import AdminEndpoints, redact_url
from .cache import VerdictCache
from .dialects import ROUTES
from .gate import Gate
from .metrics import Metrics
from .ops import OpsEndpoints
from .passthrough import MANAGEMENT, PASSTHROUGH, PassThrough
from .pipeline import GuardedRoutes
from .ratelimit import RateLimiter
from .requests import Validator
from .scanning.engine import ScanEngine, Verdict
from .scanning.policy import Policy, build_policy
from .security import Authenticator
from .settings import Settings
from .state import ProxyState
from .stats import ScannerStats, Stats
from .upstream import Upstream

log = logging.getLogger(__name__)


def create_app(settings: Settings, policy: Policy | None = None) -> FastAPI:
    """Build the proxy. `policy` may be given pre-built (tests share one llm-guard load across apps)."""
    metrics = Metrics()
    state = ProxyState(settings=settings, metrics=metrics)
    state.auth = Authenticator(settings.auth)  # fails fast on a bad keys file
    guarded, passthrough = GuardedRoutes(state), PassThrough(state)
    ops, admin = OpsEndpoints(state), AdminEndpoints(state)

    async def lifespan(app: FastAPI) -> Any:
        state.policy = policy if policy is not None else await asyncio.to_thread(build_policy, settings)
        metrics.policy_loaded(state.policy)
        state.cache = VerdictCache(settings.cache, settings.redis, metrics) if settings.cache.enabled else None
        state.engine = ScanEngine(state.policy, settings, state.cache, metrics)
        state.engine.metrics = _Observer(metrics, state.stats)
        state.validator = Validator(settings)
        if settings.rate_limit.enabled:
            use_redis = settings.rate_limit.backend == "redis" or (
                settings.rate_limit.backend == "auto" and settings.cache.backend in ("auto", "redis")
            )
            state.limiter = RateLimiter(settings.rate_limit, settings.redis, use_redis, metrics)
        state.upstream = Upstream(
            settings.ollama_url, settings.limits.upstream_connect_timeout, settings.limits.upstream_timeout
        )
        await state.upstream.start()
        await _warm_up(state)
        # Everything loaded so far (llm-guard, torch, models) lives as long as the process: move it out of
        # the collector's view, so collections in the request path stay short (the original proxy's p99 was
        # dominated by ~165 ms pauses walking these objects).
        gc.collect()
        gc.freeze()
        missing = state.policy.missing_required()
        log.log(
            logging.ERROR if missing else logging.INFO,
            "ollama-guard %s %s: upstream %s, device %s, input scanners [%s], output scanners [%s]",
            __version__,
            f"NOT ready (required scanners missing: {', '.join(m.name for m in missing)})" if missing else "ready",
            redact_url(settings.ollama_url),
            state.device,
            ", ".join(s.name for s in state.policy.active("input")),
            ", ".join(s.name for s in state.policy.active("output")),
        )
        flusher = asyncio.create_task(metrics.flush_every()) if metrics.multiprocess else None
        try:
            yield
        finally:
            if flusher is not None:
                flusher.cancel()
                metrics.flush()
            await state.upstream.close()
            if state.cache:
                await state.cache.close()
            if state.limiter:
                await state.limiter.close()
            if state.policy:
                await state.policy.aclose()
            state.engine.close()

    app = GuardApp(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None, title="ollama-guard")
    app.state.proxy = state
    direct = {path: guarded.guarded(route) for path, route in ROUTES.items()}
    for path, handler in direct.items():
        app.add_route(path, handler, methods=["POST"])
    for path, methods in PASSTHROUGH:
        app.add_route(path, passthrough.passthrough, methods=methods)
    for path, methods in MANAGEMENT:
        app.add_route(path, passthrough.management, methods=methods)
    app.add_route("/health", ops.health, methods=["GET"])
    app.add_route("/ready", ops.ready, methods=["GET"])
    app.add_route("/metrics", ops.metrics, methods=["GET"])
    app.add_route("/stats", ops.stats, methods=["GET"])
    app.add_route("/admin/cache/clear", admin.admin_cache_clear, methods=["POST"])
    app.add_route("/admin/cache/cleanup", admin.admin_cache_cleanup, methods=["POST"])
    app.add_route("/admin/stats", admin.admin_stats, methods=["GET"])
    app.add_route("/{rest:path}", ops.not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"])
    front: Any = Gate(app.inner, state=state, direct=direct)
    if settings.cors.allow_origins:
        from starlette.middleware.cors import CORSMiddleware

        # Outermost, around the gate: a preflight (OPTIONS, no credentials by the CORS rules) is answered
        # without an API key, and every answer to an allowed origin, the gate's 401/403/429 included,
        # carries the CORS headers a browser needs to read it.
        front = CORSMiddleware(
            front,
            allow_origins=settings.cors.allow_origins,
            allow_credentials=settings.cors.allow_credentials,
            allow_methods=settings.cors.allow_methods,
            allow_headers=settings.cors.allow_headers,
        )
    app.front = front
    return app


class GuardApp(FastAPI):
    """The app: HTTP requests enter at the gate (`front`), in front of the framework's own middleware layers
    (error page, body limit, telemetry: ~4 % of a cache hit's CPU), which only the routes the gate hands on
    (`inner`) go through. The guarded routes are their own error boundary; lifespan events go to the framework."""

    front: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is None or scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        await self.front(scope, receive, send)

    async def inner(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)


class _Observer:
    """Feeds the engine's verdicts to Prometheus and /stats in one pass over their results. Each scanner's
    metric children and /stats record are looked up once per (direction, scanner), not per result."""

    def __init__(self, metrics: Metrics, stats: Stats):
        self.metrics = metrics
        self.stats = stats
        self._records: dict[tuple[str, str], tuple[Any, Any, Any, ScannerStats]] = {}

    def observe_verdict(self, direction: str, verdict: Verdict) -> None:
        """Counts a fresh verdict's scanner results (a cached verdict ran no scanner: nothing is counted): the
        run time of each, its errors, the texts it fired on and, for blocking scanners, blocked."""
        if verdict.cached:
            return
        records = self._records
        for r in verdict.results:
            record = records.get((direction, r.scanner))
            if record is None:
                children = self.metrics.scanner_children(r.scanner, direction)
                record = records[(direction, r.scanner)] = (*children, self.stats.scanner(direction, r.scanner))
            seconds, errors, blocks, counts = record
            seconds.observe(r.ms / 1000.0)
            counts.scans += 1
            counts.ms.append(r.ms)
            if r.error:
                errors.inc()
                counts.errors += 1
            elif not r.valid:
                counts.fired += 1
                if r.action == "block":
                    blocks.inc()


async def _warm_up(state: ProxyState) -> None:
    """One scan per direction so first-use costs (detect-secrets plugin loading, tokenizers) are paid now."""
    assert state.engine is not None and state.policy is not None
    if not state.policy.ready:
        return
    for direction in ("input", "output"):
        if state.engine.has_scanners(direction):
            try:
                await state.engine.scan_window(
                    state.policy.active(direction),
                    "warm up the guard.",
                    "warm up",
                    direction=direction,
                    observe=False,
                )
            except Exception:  # warm-up is best effort; real scans report their own errors
                log.exception("warm-up scan failed")
