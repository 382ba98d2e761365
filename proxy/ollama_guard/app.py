"""The app factory: `create_app(settings)` builds the proxy; its lifespan owns every long-lived thing.

Request path (see docs/ARCHITECTURE.md):
  Gate (request id, security headers, IP filter, API key, rate limit, metrics)
  -> route handler: read the body under a size cap -> validate -> scan the input texts (cached per text)
  -> forward to Ollama -> scan the answer (whole, or incrementally while streaming) -> respond.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .cache import VerdictCache
from .dialects import (
    CONTENT,
    OLLAMA,
    OPENAI,
    ROUTES,
    BadRequest,
    Route,
    blocked_message_response,
    blocked_message_stream,
    chunk_parts,
    error_body,
    tool_call_texts,
    with_text,
    with_tool_call_texts,
)
from .logs import audit_log, request_id
from .metrics import Metrics
from .ratelimit import RateLimiter
from .relay import GuardedStream
from .requests import GuardedRequest, Validator
from .scanning.engine import GuardUnavailable, ScanEngine, Verdict
from .scanning.policy import Policy, build_policy
from .scanning.registry import new_vault
from .scanning.stream import StreamGuard, side_scanners
from .security import Authenticator, ClientIP, IPFilter, Principal
from .settings import Settings
from .stats import Stats
from .upstream import Upstream, UpstreamError, forward_headers, response_headers

log = logging.getLogger(__name__)

PASSTHROUGH: list[tuple[str, list[str]]] = [
    ("/", ["GET", "HEAD"]),
    ("/api/tags", ["GET"]),
    ("/api/show", ["POST"]),
    ("/api/ps", ["GET"]),
    ("/api/version", ["GET"]),
    ("/v1/models", ["GET"]),
    ("/v1/models/{model:path}", ["GET"]),
]
MANAGEMENT: list[tuple[str, list[str]]] = [
    ("/api/pull", ["POST"]),
    ("/api/push", ["POST"]),
    ("/api/create", ["POST"]),
    ("/api/copy", ["POST"]),
    ("/api/delete", ["DELETE"]),
    ("/api/blobs/{digest}", ["HEAD", "POST"]),
]
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
# Guarded routes ask Ollama for an uncompressed body (we parse it); these headers are ours, not Ollama's.
_DROP_GUARDED = frozenset({"accept-encoding", "authorization", "x-api-key", "cookie"})
_DROP_AUTH = frozenset({"authorization", "x-api-key"})


def dialect_of(path: str) -> str:
    return OPENAI if path.startswith("/v1/") else OLLAMA


def _raw_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


def make_response(body: bytes, status: int, headers: list[tuple[str, str]], media_type: str | None = None) -> Response:
    r = Response(body, status_code=status, media_type=media_type)
    r.raw_headers = [h for h in r.raw_headers if h[0] in (b"content-length", b"content-type")] + [
        h for h in _raw_headers(headers) if h[0] != b"content-type" or media_type is None
    ]
    return r


def error_response(
    dialect: str, status: int, message: str, code: str, extra: Sequence[tuple[str, str]] = ()
) -> Response:
    etype = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "api_error"
    )
    return make_response(error_body(dialect, message, code, etype), status, list(extra), "application/json")


@dataclass
class ProxyState:
    settings: Settings
    metrics: Metrics
    stats: Stats = field(default_factory=Stats)
    policy: Policy | None = None
    engine: ScanEngine | None = None
    cache: VerdictCache | None = None
    upstream: Upstream | None = None
    limiter: RateLimiter | None = None
    auth: Authenticator | None = None
    validator: Validator | None = None
    ready_reasons: list[str] = field(default_factory=list)

    @property
    def device(self) -> str:
        return self.policy.device.name if self.policy and self.policy.device else "cpu"


# ---- the gate: every request passes here ----------------------------------------------------------------


class Gate:
    """Pure ASGI middleware (no per-request task or body copy): identity, access, limits, headers, metrics."""

    def __init__(self, app: ASGIApp, state: ProxyState):
        self.app = app
        self.state = state
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
        dialect = dialect_of(path) if label not in PROBES else "other"

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
                hdrs = list(message.get("headers") or [])
                for k, v in hdrs:
                    if k == b"x-guard-decision":
                        outcome["decision"] = v.split(b";", 1)[0].decode()
                        break
                else:
                    outcome["decision"] = "allowed" if message["status"] < 400 else "error"
                hdrs.extend(extra)
                message = {**message, "headers": hdrs}
            await send(message)

        st.metrics.in_flight.inc()
        try:
            denial = None if path in PROBES else await self._check(scope, headers, path, extra)
            if denial is not None:
                response, decision = denial
                outcome["decision"] = decision
                if path in ROUTES and st.settings.logging.audit:
                    # Refused at the gate (401, 403, 429): where abuse shows, so recorded like any outcome.
                    record = {
                        "who": scope.get("state", {}).get("client_ip"),
                        "route": path,
                        "decision": decision,
                        "status": response.status_code,
                    }
                    audit_log.info("guarded request", extra={"audit": record, "request_id": rid})
                await response(scope, receive, _with_decision(send_wrapped, decision))
            else:
                await self.app(scope, receive, send_wrapped)
        finally:
            st.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            if st.settings.metrics_enabled:
                st.metrics.requests.labels(label, dialect, str(outcome["status"]), outcome["decision"]).inc()
                st.metrics.request_seconds.labels(label, dialect).observe(elapsed)
            if label not in PROBES:
                st.stats.request(int(outcome["status"]), str(outcome["decision"]), elapsed * 1000.0)
            request_id.reset(token)

    async def _check(
        self, scope: Scope, headers: dict[bytes, bytes], path: str, extra: list[tuple[bytes, bytes]]
    ) -> tuple[Response, str] | None:
        st = self.state
        dialect = dialect_of(path)
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


def _new_id() -> str:
    import uuid

    return uuid.uuid4().hex


def _with_decision(send: Send, decision: str) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {
                **message,
                "headers": [*message.get("headers", []), (b"x-guard-decision", decision.encode())],
            }
        await send(message)

    return wrapped


# ---- handlers -------------------------------------------------------------------------------------------


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length")
        if int(declared) > limit:
            raise BadRequest(f"request body larger than {limit} bytes", 413, "body_too_large")

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"request body larger than {limit} bytes", 413, "body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), timeout)
    except TimeoutError:
        raise BadRequest("request body not received in time", 408, "body_timeout") from None


def decision_header(decision: str, scanners: list[str]) -> tuple[str, str]:
    return ("X-Guard-Decision", f"{decision}; scanners={','.join(scanners)}" if scanners else decision)


def scan_header(*groups: tuple[str, Sequence[Verdict]]) -> tuple[str, str] | None:
    """`X-Guard-Scanners: input:Secrets;score=1.00;ms=2.9, ...`: per scanner, the top score and total time."""
    merged: dict[tuple[str, str], tuple[float, float]] = {}
    for direction, verdicts in groups:
        for r in (r for v in verdicts for r in v.results):
            score, ms = merged.get((direction, r.scanner), (-1.0, 0.0))
            merged[(direction, r.scanner)] = (max(score, r.score), ms + r.ms)
    if not merged:
        return None
    value = ", ".join(f"{d}:{n};score={s:.2f};ms={ms:.1f}" for (d, n), (s, ms) in merged.items())
    return ("X-Guard-Scanners", value)


class Handlers:
    def __init__(self, state: ProxyState):
        self.st = state

    # -- guarded routes --
    def guarded(self, route: Route) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            try:
                return await self._guarded(request, route)
            except BadRequest as exc:
                self._audit_failure(request, exc.status, "refused" if exc.status == 403 else "invalid")
                return error_response(route.dialect, exc.status, exc.message, exc.code)
            except UpstreamError as exc:
                self.st.metrics.upstream_errors.labels(exc.kind).inc()
                self._audit_failure(request, exc.status, "error", upstream=exc.kind)
                return error_response(route.dialect, exc.status, exc.message, "upstream_" + exc.kind)
            except ClientDisconnect:
                # The client went away while sending its body: nobody to answer; counted as 499, no traceback.
                self._audit_failure(request, 499, "client_closed")
                return Response(status_code=499)
            except GuardUnavailable as exc:
                return error_response(
                    route.dialect,
                    503,
                    f"guard not ready: required scanners missing ({exc})",
                    "guard_unavailable",
                    [decision_header("error", str(exc).split(", "))],
                )

        return handler

    async def _guarded(self, request: Request, route: Route) -> Response:
        st, s = self.st, self.st.settings
        assert st.engine is not None and st.validator is not None and st.upstream is not None
        raw = await read_body(request, s.limits.max_body_bytes, s.limits.body_read_timeout)
        req = st.validator.parse(raw, route)
        request.scope.setdefault("state", {})["guarded"] = (req, time.perf_counter())
        assert st.policy is not None
        if st.policy.missing_required():
            # Fail closed before anything is forwarded: a required guard is not there.
            raise GuardUnavailable(", ".join(x.name for x in st.policy.missing_required()))
        started = time.perf_counter()
        vault = new_vault() if st.policy.needs_vault() else None
        in_verdicts: list[Verdict] = []
        decision, fired = "allowed", []
        if s.enable_input_guard and st.engine.has_scanners("input") and req.targets:
            in_verdicts = await st.engine.scan_many("input", [t.text for t in req.targets], vault=vault)
            blocked = [v for v in in_verdicts if v.blocked]
            if blocked:
                return self._blocked(request, req, blocked, "input", started)
            for t, v in zip(req.targets, in_verdicts, strict=True):
                if v.sanitized:
                    t.set(v.text)
                    decision = "sanitized"
                fired.extend(v.fired)
        # Send what was read and scanned (mediation.py): the body as parsed, never the client's bytes.
        raw = orjson.dumps(req.body)
        headers = forward_headers(request.headers.items(), _DROP_GUARDED)
        headers.append(("Accept-Encoding", "identity"))
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        up_started = time.perf_counter()
        resp = await _until_disconnect(request, st.upstream.open("POST", path, headers, raw))
        if resp is None:
            return Response(status_code=499)
        st.metrics.upstream_seconds.labels(route.path).observe(time.perf_counter() - up_started)
        guard_headers = [decision_header(decision, sorted(set(fired)))]
        sh = scan_header(("input", in_verdicts))
        if sh:
            guard_headers.append(sh)
        out_on = (
            s.enable_output_guard
            and st.engine.has_scanners("output")
            and route.kind in ("chat", "generate", "completion")
        )
        if req.stream and resp.status == 200 and resp.headers.get("Content-Encoding") is None:
            up_headers = response_headers(resp.headers)
            if not out_on:
                return _stream_response(_raw_relay(resp), resp.status, up_headers + guard_headers)
            engine = st.engine
            relay: GuardedStream = GuardedStream(
                resp,
                route,
                lambda side: StreamGuard(engine, s, prompt=req.prompt, vault=vault, side=side),
                req.model,
                s.blocked_message if s.blocked_response == "message" else None,
                on_end=lambda v: self._stream_ended(request, req, v, relay, decision, fired, in_verdicts, started),
                on_abandon=lambda: self._audit(
                    request, req, "client_closed", fired, in_verdicts, [], 499, started, stream_abandoned=True
                ),
            )
            return _stream_response(relay.__aiter__(), resp.status, up_headers + guard_headers)
        try:
            body = await _until_disconnect(request, Upstream.read(resp))
        finally:
            resp.release()
        if body is None:
            return Response(status_code=499)
        up_headers = response_headers(resp.headers)
        if resp.headers.get("Content-Encoding"):
            raise UpstreamError(502, "protocol", "Ollama sent a compressed body to a guarded route")
        if resp.status != 200:
            return await self._upstream_refused(request, req, resp.status, body, decision, fired, in_verdicts, started)
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamError(502, "protocol", "Ollama's answer is not JSON") from None
        if not isinstance(obj, dict):
            raise UpstreamError(502, "protocol", "Ollama's answer is not a JSON object")
        if not out_on:
            self._audit(request, req, decision, fired, in_verdicts, [], resp.status, started)
            return make_response(body, resp.status, up_headers + guard_headers)
        out_verdicts, answer = await self._scan_answer(route, obj, req.prompt, vault)
        blocked_out = [v for v in out_verdicts if v.blocked]
        if blocked_out:
            return self._blocked(request, req, blocked_out, "output", started, in_verdicts)
        for v in out_verdicts:
            fired.extend(v.fired)
        if answer is not obj:
            body = orjson.dumps(answer)
            decision = "sanitized"
        guard_headers[0] = decision_header(decision, sorted(set(fired)))
        sh = scan_header(("input", in_verdicts), ("output", out_verdicts))
        guard_headers[1:] = [sh] if sh else []
        self._audit(request, req, decision, fired, in_verdicts, out_verdicts, 200, started)
        return make_response(body, 200, up_headers + guard_headers)

    async def _upstream_refused(
        self,
        request: Request,
        req: GuardedRequest,
        status: int,
        body: bytes,
        decision: str,
        fired: list[str],
        in_verdicts: list[Verdict],
        started: float,
    ) -> Response:
        """Ollama answered with an error. A 4xx (model not found, bad option) keeps its status; anything else is
        a broken upstream: 502. Ollama's own error text is shown when it is JSON, scanned like any output;
        otherwise (an HTML page, a traceback) our own message."""
        assert self.st.engine is not None
        text: str | None = None
        try:
            parsed = orjson.loads(body)
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
                text = parsed["error"][:2000]
        except orjson.JSONDecodeError:
            pass
        if text is not None and self.st.settings.enable_output_guard and self.st.engine.has_scanners("output"):
            verdict = await self.st.engine.scan_window(side_scanners(self.st.engine), text, req.prompt, None)
            text = None if verdict.blocked else verdict.text
        client_error = 400 <= status < 500
        answer_status = status if client_error else 502
        message = f"Ollama: {text}" if text else f"Ollama failed (HTTP {status})"
        self.st.metrics.upstream_errors.labels("status").inc()
        self._audit(request, req, "error", fired, in_verdicts, [], answer_status, started, upstream_status=status)
        return error_response(
            req.route.dialect,
            answer_status,
            message,
            "upstream_rejected" if client_error else "upstream_error",
            [decision_header(decision if client_error else "error", sorted(set(fired)))],
        )

    async def _scan_answer(self, route: Route, obj: Any, prompt: str, vault: Any) -> tuple[list[Verdict], Any]:
        """Scan every text of a whole answer: the content with every output scanner (cached), the thinking
        and each tool call's arguments with all but the answer-only ones. Returns the verdicts and the answer
        to send: the same object when nothing was sanitized, a rewritten copy when something was."""
        engine = self.st.engine
        assert engine is not None
        side = side_scanners(engine)
        calls = tool_call_texts(route, obj) if side else []  # no scanner watches anything but the answer
        targets = [(ch, t) for ch, t in chunk_parts(route, obj) if ch == CONTENT or side]
        targets += [("tool", t) for t in calls if t]

        async def scan(channel: str, text: str) -> Verdict:
            if channel == CONTENT:
                return (await engine.scan_many("output", [text], prompt=prompt, vault=vault))[0]
            return await engine.scan_window(side, text, prompt, vault)

        verdicts = list(await asyncio.gather(*(scan(ch, t) for ch, t in targets)))
        if any(v.blocked for v in verdicts) or not any(v.sanitized for v in verdicts):
            return verdicts, obj
        answer = obj
        for (ch, _), v in zip(targets, verdicts, strict=True):
            if v.sanitized and ch != "tool":
                answer = with_text(route, answer, v.text, ch)
        tool_verdicts = iter(v for (ch, _), v in zip(targets, verdicts, strict=True) if ch == "tool")
        new_calls = [next(tool_verdicts).text if t else t for t in calls]
        if new_calls != calls:
            rewritten = with_tool_call_texts(route, answer, new_calls)
            if rewritten is None:  # sanitized arguments that no longer parse cannot be sent
                for v in verdicts:
                    v.blocked = v.blocked or v.sanitized
                return verdicts, obj
            answer = rewritten
        return verdicts, answer

    def _blocked(
        self,
        request: Request,
        req: GuardedRequest,
        verdicts: list[Verdict],
        direction: str,
        started: float,
        earlier: Sequence[Verdict] = (),
    ) -> Response:
        s = self.st.settings
        names = sorted({n for v in verdicts for n in (v.blocked_by or v.fired)})
        errored = any(v.error for v in verdicts) and not any(
            not r.valid and r.error is None and r.action == "block" for v in verdicts for r in v.results
        )
        decision = "error" if errored else "blocked"
        headers = [decision_header(decision, names)]
        sh = scan_header((direction, verdicts))
        if sh:
            headers.append(sh)
        self._audit(
            request,
            req,
            decision,
            names,
            list(earlier) if direction == "output" else verdicts,
            verdicts if direction == "output" else [],
            403,
            started,
        )
        if s.blocked_response == "message" and req.route.kind in ("chat", "generate", "completion") and not errored:
            if req.stream:
                return _stream_response(
                    _iter_list(blocked_message_stream(req.route, req.model, s.blocked_message)),
                    200,
                    headers,
                    "application/x-ndjson" if req.route.dialect == OLLAMA else "text/event-stream",
                )
            return make_response(
                blocked_message_response(req.route, req.model, s.blocked_message),
                200,
                headers,
                "application/json",
            )
        if errored:
            return error_response(
                req.route.dialect,
                503,
                f"a guard failed while checking the {direction} "
                f"({', '.join(names)}); refused because block_on_guard_error is on",
                "guard_error",
                headers,
            )
        what = "prompt" if direction == "input" else "answer"
        return error_response(
            req.route.dialect,
            403,
            f"The {what} was blocked by the guard: {', '.join(names)}.",
            f"{'prompt' if direction == 'input' else 'output'}_blocked",
            headers,
        )

    def _stream_ended(
        self,
        request: Request,
        req: GuardedRequest,
        violation: Verdict | None,
        relay: GuardedStream,
        decision: str,
        fired: list[str],
        in_verdicts: list[Verdict],
        started: float,
    ) -> None:
        """The audit record of a streamed answer, written when the stream has ended (stopped or whole)."""
        out = Verdict("", violation is not None, relay.sanitized, False, relay.results)
        if violation is not None:
            names = violation.blocked_by or violation.fired
            for n in names:
                self.st.metrics.streams_stopped.labels(req.route.dialect, n).inc()
            self._audit(request, req, "blocked", names, in_verdicts, [out], 200, started, stream_stopped=True)
            return
        if relay.sanitized:
            decision = "sanitized"
        self._audit(
            request,
            req,
            decision,
            fired + out.fired,
            in_verdicts,
            [out],
            200,
            started,
            scanned_chars=relay.scanned_chars,
        )

    def _audit_failure(self, request: Request, status: int, decision: str, **extra: Any) -> None:
        """The audit record of a guarded request that ended in an exception (a 4xx before or after parsing,
        a 502/504, a client gone): one per request, like every other outcome."""
        guarded = request.scope.get("state", {}).get("guarded")
        if guarded is not None:
            req, started = guarded
            self._audit(request, req, decision, [], [], [], status, started, **extra)
            return
        if not self.st.settings.logging.audit:
            return
        principal = request.scope.get("state", {}).get("principal")
        record = {
            "who": principal.name if principal else request.scope.get("state", {}).get("client_ip"),
            "route": request.url.path,
            "decision": decision,
            "status": status,
            **extra,
        }
        audit_log.info("guarded request", extra={"audit": record, "request_id": request_id.get()})

    def _audit(
        self,
        request: Request,
        req: GuardedRequest,
        decision: str,
        fired: list[str],
        in_v: list[Verdict],
        out_v: list[Verdict],
        status: int,
        started: float,
        **extra: Any,
    ) -> None:
        s = self.st.settings
        if not s.logging.audit:
            return
        principal = request.scope.get("state", {}).get("principal")
        # Per scanner and direction: the highest score among those that fired, and the total scan time
        # (a streamed answer is scanned in many windows).
        scores: dict[str, float] = {}
        scan_ms: dict[str, float] = {}
        for d, verdicts in (("input", in_v), ("output", out_v)):
            for r in (r for v in verdicts for r in v.results):
                key = f"{d}:{r.scanner}"
                scan_ms[key] = scan_ms.get(key, 0.0) + r.ms
                if r.fired:
                    scores[key] = max(scores.get(key, -1.0), round(r.score, 3))
        record: dict[str, Any] = {
            "who": principal.name if principal else request.scope.get("state", {}).get("client_ip"),
            "model": req.model,
            "route": req.route.path,
            "stream": req.stream,
            "decision": decision,
            "status": status,
            "fired": sorted(set(fired)),
            "scores": scores,
            "scan_ms": {k: round(v, 2) for k, v in scan_ms.items()},
            "cached": sum(1 for v in in_v if v.cached),
            "ms": round((time.perf_counter() - started) * 1000.0, 2),
            **extra,
        }
        if s.logging.log_content:
            record["prompt"] = req.prompt
        audit_log.info("guarded request", extra={"audit": record, "request_id": request_id.get()})

    # -- pass-through and management --
    async def passthrough(self, request: Request) -> Response:
        dialect = dialect_of(request.url.path)
        try:
            return await self._forward(request)
        except BadRequest as exc:
            return error_response(dialect, exc.status, exc.message, exc.code)
        except UpstreamError as exc:
            self.st.metrics.upstream_errors.labels(exc.kind).inc()
            return error_response(dialect, exc.status, exc.message, "upstream_" + exc.kind)

    async def management(self, request: Request) -> Response:
        if not self.st.settings.management.allow_model_management:
            return error_response(
                OLLAMA,
                403,
                "model management endpoints are disabled on this proxy (management.allow_model_management)",
                "management_disabled",
            )
        return await self.passthrough(request)

    async def _forward(self, request: Request) -> Response:
        st = self.st
        assert st.upstream is not None
        raw_path = request.scope.get("raw_path", b"").decode("latin-1").lower()
        segments = request.url.path.split("/")
        if ".." in segments or "." in segments or "%2e" in raw_path or "%2f" in raw_path or "%5c" in raw_path:
            # /v1/models/../../api/pull would reach Ollama as /api/pull once the client library normalises it:
            # only the routes the proxy names are forwarded, so dot segments and encoded separators are not.
            return error_response(dialect_of(request.url.path), 404, "path not served by the guard", "not_found")
        body: Any = None
        if request.method in ("POST", "PUT", "DELETE"):
            if request.url.path.startswith("/api/blobs/"):
                body = request.stream()  # model layers: streamed, never held in memory
            else:
                body = await read_body(request, st.settings.limits.max_body_bytes, st.settings.limits.body_read_timeout)
        drop = _DROP_AUTH if st.settings.auth.enabled else frozenset()
        headers = forward_headers(request.headers.items(), drop)
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        resp = await st.upstream.open(request.method, path, headers, body)
        return _stream_response(_raw_relay(resp), resp.status, response_headers(resp.headers))

    # -- operations --
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
        cache_cfg = st.settings.cache
        if cache_cfg.enabled and cache_cfg.backend == "redis" and st.cache is not None:
            # `redis` is the strict setting: a replica without the shared cache is taken out of rotation
            # (it still answers what reaches it, from memory); `auto` stays ready and falls back.
            if not await st.cache.reachable():
                reasons.append("cache.backend is redis and Redis does not answer")
        body = {"ready": not reasons, **({"reasons": reasons} if reasons else {})}
        return make_response(orjson.dumps(body), 503 if reasons else 200, [], "application/json")

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
        }
        return make_response(orjson.dumps(body), 200, [], "application/json")

    async def admin_cache_clear(self, request: Request) -> Response:
        removed = await self.st.cache.clear() if self.st.cache else {}
        log.info("verdict cache cleared by admin", extra={"removed": removed})
        return make_response(orjson.dumps({"cleared": removed}), 200, [], "application/json")

    async def admin_cache_cleanup(self, request: Request) -> Response:
        removed = self.st.cache.purge_expired() if self.st.cache else {}
        return make_response(orjson.dumps({"expired_removed": removed}), 200, [], "application/json")

    async def admin_stats(self, request: Request) -> Response:
        st = self.st
        body = {
            "settings": _without_credentials(
                st.settings.model_dump(mode="json", exclude={"auth": True, "redis": {"password"}})
            ),
            "policy_fingerprints": st.policy.fingerprints if st.policy else {},
            "scanners": {f"{s.direction}/{s.name}": s.describe() for s in (st.policy.all() if st.policy else [])},
            "api_keys": [k.name for k in (st.auth.keys if st.auth else [])],
        }
        return make_response(orjson.dumps(body), 200, [], "application/json")

    async def not_found(self, request: Request) -> Response:
        return error_response(
            dialect_of(request.url.path), 404, f"{request.url.path} is not served by the guard", "not_found"
        )


def redact_url(url: str | None) -> str | None:
    """`url` with the password of its userinfo replaced (redis://:secret@host -> redis://:***@host)."""
    if not url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _without_credentials(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings shown by /admin/stats: every URL's password redacted."""
    redis = settings.get("redis")
    if isinstance(redis, dict) and isinstance(redis.get("url"), str):
        redis["url"] = redact_url(redis["url"])
    if isinstance(settings.get("ollama_url"), str):
        settings["ollama_url"] = redact_url(settings["ollama_url"])
    return settings


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work` unless the client goes away first; then cancel it (closing the upstream request)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    return None


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _raw_relay(resp: Any) -> Any:
    done = False
    try:
        async for chunk in resp.content.iter_any():
            yield chunk
        done = True
    finally:
        # Cut short (client gone, error): close the connection so Ollama stops; else back to the pool.
        resp.release() if done else resp.close()


async def _iter_list(items: list[bytes]) -> Any:
    for item in items:
        yield item


class _DisconnectAwareStreamingResponse(StreamingResponse):
    """Streams while watching for the client to go away, whatever ASGI spec version the server speaks.

    Starlette relies on `send` raising once the client is gone (ASGI >= 2.4), but a server may drop writes to
    a closed connection silently, and a guarded stream would then pull Ollama's whole answer for nobody.
    Cancelling the body iterator runs its `finally`, which closes the upstream connection.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        import anyio

        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                await self.stream_response(send)
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()


def _stream_response(gen: Any, status: int, headers: list[tuple[str, str]], media_type: str | None = None) -> Response:
    r = _DisconnectAwareStreamingResponse(gen, status_code=status, media_type=media_type)
    r.raw_headers = [h for h in r.raw_headers if h[0] == b"content-type"] + [
        h for h in _raw_headers(headers) if h[0] != b"content-type" or media_type is None
    ]
    return r


# ---- the factory ----------------------------------------------------------------------------------------


def create_app(settings: Settings, policy: Policy | None = None) -> FastAPI:
    """Build the proxy. `policy` may be given pre-built (tests share one llm-guard load across apps)."""
    metrics = Metrics()
    state = ProxyState(settings=settings, metrics=metrics)
    state.auth = Authenticator(settings.auth)  # fails fast on a bad keys file
    handlers = Handlers(state)

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
        try:
            yield
        finally:
            await state.upstream.close()
            if state.cache:
                await state.cache.close()
            if state.limiter:
                await state.limiter.close()
            state.engine.close()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None, title="ollama-guard")
    app.state.proxy = state
    for path, route in ROUTES.items():
        app.add_route(path, handlers.guarded(route), methods=["POST"])
    for path, methods in PASSTHROUGH:
        app.add_route(path, handlers.passthrough, methods=methods)
    for path, methods in MANAGEMENT:
        app.add_route(path, handlers.management, methods=methods)
    app.add_route("/health", handlers.health, methods=["GET"])
    app.add_route("/ready", handlers.ready, methods=["GET"])
    app.add_route("/metrics", handlers.metrics, methods=["GET"])
    app.add_route("/stats", handlers.stats, methods=["GET"])
    app.add_route("/admin/cache/clear", handlers.admin_cache_clear, methods=["POST"])
    app.add_route("/admin/cache/cleanup", handlers.admin_cache_cleanup, methods=["POST"])
    app.add_route("/admin/stats", handlers.admin_stats, methods=["GET"])
    app.add_route("/{rest:path}", handlers.not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"])
    if settings.cors.allow_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors.allow_origins,
            allow_credentials=settings.cors.allow_credentials,
            allow_methods=settings.cors.allow_methods,
            allow_headers=settings.cors.allow_headers,
        )
    app.add_middleware(Gate, state=state)
    return app


class _Observer:
    """Feeds engine verdicts to both Prometheus and /stats."""

    def __init__(self, metrics: Metrics, stats: Stats):
        self.metrics = metrics
        self.stats = stats

    def observe_verdict(self, direction: str, verdict: Verdict) -> None:
        self.metrics.observe_verdict(direction, verdict)
        self.stats.verdict(direction, verdict)


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
