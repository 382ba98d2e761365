"""Operations endpoints: /health, /ready, /metrics, /stats, and the 404 for every route the proxy does not
serve (never forwarded)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from . import __version__
from .admin import redact_url
from .dialects import OLLAMA
from .responses import dialect_of, error_response, make_response
from .state import ProxyState


class OpsEndpoints:
    def __init__(self, state: ProxyState):
        self.st = state

    async def health(self, request: Request) -> Response:
        st = self.st
        policy = st.policy
        body = {
            "status": "ok",
            "version": __version__,
            "device": st.device,
            "ready": bool(policy and policy.ready),
            "guards": {"input": st.settings.enable_input_guard, "output": st.settings.enable_output_guard},
            "scanners": {f"{s.direction}/{s.name}": s.describe() for s in (policy.all() if policy else [])},
        }
        missing = [f"{s.direction}/{s.name}: {s.missing}" for s in (policy.all() if policy else []) if s.missing]
        missing += [f"{name}: {why}" for name, why in await self._absent_guard_models()]
        if missing:
            body["problems"] = missing
        return make_response(orjson.dumps(body), 200, [], "application/json")

    async def ready(self, request: Request) -> Response:
        st = self.st
        reasons = list(st.ready_reasons)
        if st.policy is None:
            reasons.append("scanners not loaded yet")
        else:
            reasons += [
                f"required scanner {s.direction}/{s.name} missing: {s.missing}" for s in st.policy.missing_required()
            ]
            reasons += [
                f"required guard model {name} missing: {why}"
                for name, why in await self._absent_guard_models(required_only=True)
            ]
        cache_cfg = st.settings.cache
        if cache_cfg.enabled and cache_cfg.backend == "redis" and st.cache is not None:
            # `redis` is the strict setting: a replica without the shared cache is taken out of rotation
            # (it still answers what reaches it, from memory); `auto` stays ready and falls back.
            if not await st.cache.reachable():
                reasons.append("cache.backend is redis and Redis does not answer")
        body = {"ready": not reasons, **({"reasons": reasons} if reasons else {})}
        return make_response(orjson.dumps(body), 503 if reasons else 200, [], "application/json")

    async def _absent_guard_models(self, required_only: bool = False) -> list[tuple[str, str]]:
        """(scanner, why) for each loaded guard-model scanner whose model Ollama does not have (`/api/show`)."""
        policy = self.st.policy
        remote = [s for s in (policy.all() if policy else []) if s.stype.remote and s.loaded]
        remote = [s for s in remote if s.required or not required_only]
        found = await asyncio.gather(*(s.instance.present() for s in remote))
        return [(f"{s.direction}/{s.name}", why) for s, why in zip(remote, found, strict=True) if why]

    async def metrics(self, request: Request) -> Response:
        if not self.st.settings.metrics_enabled:
            return error_response(OLLAMA, 404, "metrics are disabled", "not_found")
        self.st.metrics.sample_process(self.st.device)
        data, ctype = self.st.metrics.render()
        return make_response(data, 200, [], ctype)

    async def stats(self, request: Request) -> Response:
        import platform

        st = self.st
        assert st.upstream is not None
        up_ok, up_s = await st.upstream.health()
        body: dict[str, Any] = {
            "version": __version__,
            "platform": {
                "system": platform.system(),
                "machine": platform.machine(),
                "python": platform.python_version(),
                "device": st.device,
                "fp16": bool(st.policy and st.policy.device and st.policy.device.fp16),
            },
            "upstream": {
                "url": redact_url(st.settings.ollama_url),
                "healthy": up_ok,
                "latency_ms": round(up_s * 1000, 2) if up_s is not None else None,
            },
            "cache": await st.cache.stats() if st.cache else {"enabled": False},
            "rate_limit": {
                "enabled": st.limiter is not None,
                "backend": st.limiter.backend if st.limiter else None,
            },
            **st.stats.snapshot(),
            "scan_engine": self._engine_stats(),
        }
        return make_response(orjson.dumps(body), 200, [], "application/json")

    def _engine_stats(self) -> dict[str, Any]:
        """How model scans were batched (per model scanner), and the native ids of the threads that scan, so a
        benchmark can split the process's CPU between the event loop, the scan pool, the batchers and the
        model's own threads (docs/SCAN_ENGINE.md)."""
        import os
        import threading

        st = self.st
        models: dict[str, Any] = {}
        batchers: list[int] = []
        for s in st.policy.all() if st.policy else []:
            inst = getattr(s.instance, "inner", s.instance)
            clf = getattr(inst, "classifier", None)
            if clf is None:
                continue
            b = clf.stats
            models[f"{s.direction}/{s.name}"] = {
                "batches": b.batches,
                "texts": b.texts,
                "mean_batch": round(b.texts / b.batches, 2) if b.batches else 0.0,
                "passes": b.passes,
                "windows": b.windows,
                "max_pass_rows": b.max_pass_rows,
            }
            thread = getattr(clf, "_thread", None)
            if thread is not None and thread.native_id is not None:
                batchers.append(thread.native_id)
        pool = st.engine.executor._threads if st.engine is not None else set()  # noqa: SLF001 - ids only
        return {
            "models": models,
            "threads": {
                "event_loop": threading.main_thread().native_id or os.getpid(),
                "scan_pool": sorted(t.native_id for t in pool if t.native_id is not None),
                "batchers": sorted(set(batchers)),
            },
        }

    async def not_found(self, request: Request) -> Response:
        return error_response(
            dialect_of(request.url.path), 404, f"{request.url.path} is not served by the guard", "not_found"
        )
