"""Stage 1, the gate: every request passes here before any route (pure ASGI middleware).

Request id, security headers, client address and IP filter, API key or admin token, rate limit, and the
request's metrics label (one per request, whatever the outcome). A request refused here (401, 403, 429) never
reaches a route; on a guarded route it still gets its audit record.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .dialects import ROUTES
from .logs import audit_log, request_id, short_audit_record
from .passthrough import MANAGEMENT, PASSTHROUGH
from .responses import dialect_of, error_response
from .security import Authenticator, ClientIP, IPFilter, Principal
from .state import ProxyState

PROBES = frozenset({"/health", "/ready", "/metrics"})
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"cross-origin-resource-policy", b"same-site"),
]
HSTS = (b"strict-transport-security", b"max-age=31536000; includeSubDomains")
# Route labels for metrics: the fixed set of paths, everything else "other" (bounded cardinality).
ROUTE_LABELS = {p for p, _ in PASSTHROUGH + MANAGEMENT} | set(ROUTES) | PROBES | {"/stats"}


class Gate:
    """Pure ASGI middleware (no per-request task or body copy): identity, access, limits, headers, metrics."""

    def __init__(self, app: ASGIApp, state: ProxyState, direct: dict[str, Any] | None = None):
        self.app = app
        self.state = state
        # path -> handler(Request) -> Response for the guarded POST routes: called here, not through the
        # framework's middleware and router layers (~15 % of a cache hit's CPU). Each handler is its own
        # error boundary (pipeline.GuardedRoutes.guarded), so those layers add nothing for them.
        self.direct = direct or {}
        s = state.settings
        self.client_ip = ClientIP(s.ip_filter.trusted_proxies)
        self.ip_filter = IPFilter(s.ip_filter)
        self.extra = SECURITY_HEADERS + ([HSTS] if s.tls else [])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        st = self.state
        started = time.perf_counter()
        path: str = scope["path"]
        headers = dict(scope["headers"])
        rid_raw = headers.get(b"x-request-id", b"")
        rid = (
            rid_raw.decode("latin-1")
            if 0 < len(rid_raw) <= 128 and rid_raw.isascii() and b" " not in rid_raw
            else _new_id()
        )
        token = request_id.set(rid)
        extra = [*self.extra, (b"x-request-id", rid.encode("latin-1"))]
        outcome: dict[str, Any] = {"status": 500, "decision": "error"}
        label = (
            path
            if path in ROUTE_LABELS
            else (
                "/v1/models/{model}"
                if path.startswith("/v1/models/")
                else "/api/blobs/{digest}"
                if path.startswith("/api/blobs/")
                else "/admin"
                if path.startswith("/admin/")
                else "other"
            )
        )
        dialect = dialect_of(path)
        metrics_dialect = dialect if label not in PROBES else "other"

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
                hdrs = list(message.get("headers") or [])
                outcome["decision"] = _decision_of(hdrs, message["status"])
                hdrs.extend(extra)
                message = {**message, "headers": hdrs}
            await send(message)

        st.metrics.in_flight_count.inc()
        try:
            denial = None if path in PROBES else await self._check(scope, headers, path, dialect, extra)
            if denial is not None:
                response, decision = denial
                outcome["decision"] = decision
                if path in ROUTES and st.settings.logging.audit:
                    # Refused at the gate (401, 403, 429): where abuse shows, so recorded like any outcome.
                    record = short_audit_record(scope, path, decision, response.status_code)
                    audit_log.info("guarded request", extra={"audit": record, "request_id": rid})
                await response(scope, receive, _with_decision(send_wrapped, decision))
            elif scope["method"] == "POST" and path in self.direct:
                # The handler's response is at hand before it is sent: its headers take ours here, and its
                # messages (a stream's every chunk) go to the server's `send` as they are, not through a wrapper.
                response = await self.direct[path](Request(scope, receive))
                outcome["status"] = response.status_code
                outcome["decision"] = _decision_of(response.raw_headers, response.status_code)
                response.raw_headers.extend(extra)  # a list made for this response
                await response(scope, receive, send)
            else:
                await self.app(scope, receive, send_wrapped)
        finally:
            st.metrics.in_flight_count.dec()
            elapsed = time.perf_counter() - started
            if st.settings.metrics_enabled:
                m = st.metrics
                m.child(m.requests, label, metrics_dialect, str(outcome["status"]), outcome["decision"]).inc()
                m.child(m.request_seconds, label, metrics_dialect).observe(elapsed)
            if label not in PROBES:
                st.stats.request(int(outcome["status"]), str(outcome["decision"]), elapsed * 1000.0)
            request_id.reset(token)

    async def _check(
        self, scope: Scope, headers: dict[bytes, bytes], path: str, dialect: str, extra: list[tuple[bytes, bytes]]
    ) -> tuple[Response, str] | None:
        st = self.state
        peer = scope.get("client")
        xff = headers.get(b"x-forwarded-for")
        ip = self.client_ip.resolve(peer[0] if peer else None, xff.decode("latin-1") if xff else None)
        scope.setdefault("state", {})["client_ip"] = ip
        if not self.ip_filter.permits(ip):
            return error_response(dialect, 403, "client address not allowed", "ip_denied"), "denied"
        auth = st.auth
        assert auth is not None
        presented = Authenticator.presented(headers)
        if path.startswith("/admin/"):
            if not (auth.admin_configured and st.settings.management.admin_enabled):
                return error_response(dialect, 404, "admin endpoints are not enabled", "not_found"), "denied"
            if not auth.check_admin(presented):
                return error_response(
                    dialect, 401, "admin token required", "unauthorized", [("WWW-Authenticate", "Bearer")]
                ), "denied"
            return None
        principal: Principal | None = None
        if auth.enabled:
            principal = auth.check_key(presented)
            if principal is None and not (path == "/stats" and auth.check_admin(presented)):
                return error_response(
                    dialect,
                    401,
                    "a valid API key is required",
                    "invalid_api_key",
                    [("WWW-Authenticate", "Bearer")],
                ), "denied"
        scope["state"]["principal"] = principal
        if st.limiter is not None and path != "/stats":
            who = f"key:{principal.name}" if principal else f"ip:{ip}"
            decision = await st.limiter.take(who, st.limiter.limits_for(principal.key if principal else None))
            rl_headers = [(k.lower().encode(), v.encode()) for k, v in decision.headers()]
            extra.extend(rl_headers)
            if not decision.allowed:
                st.metrics.rate_limited.labels(principal.name if principal else "anonymous").inc()
                return error_response(
                    dialect, 429, "rate limit exceeded; retry later", "rate_limit_exceeded"
                ), "rate_limited"
        return None


_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def _new_id() -> str:
    """32 hex digits, unique across processes: 64 random bits fixed per process, then a 64-bit counter (a
    uuid4 per request cost ~2 % of a cache hit's CPU)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def _decision_of(headers: list[tuple[bytes, bytes]], status: int) -> str:
    """The guard's decision, as an answer's X-Guard-Decision gives it; without one, by the status."""
    for k, v in headers:
        if k == b"x-guard-decision":
            return v.split(b";", 1)[0].decode()
    return "allowed" if status < 400 else "error"


def _with_decision(send: Send, decision: str) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {
                **message,
                "headers": [*message.get("headers", []), (b"x-guard-decision", decision.encode())],
            }
        await send(message)

    return wrapped
