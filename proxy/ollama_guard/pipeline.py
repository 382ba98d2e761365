"""Stage 2, the guarded route: the pipeline every generating or embedding request goes through.

    read the body (size cap, time limit) -> read it as Ollama does and validate (requests.py, mediation.py)
    -> scan the input texts (cached per text) -> forward the body built from what was scanned
    -> scan the answer (whole, or incrementally while streaming, relay.py) -> respond in the caller's dialect

`GuardedRoutes.guarded(route)` is the error boundary: every exception a stage raises becomes the dialect's
answer there, and only there (BadRequest -> 4xx, UpstreamError -> 502/504, GuardUnavailable -> 503, a client
gone mid-body -> 499, anything unexpected -> 503 with its traceback logged), with one metrics label (the
gate's) and one audit record per request: each stage leaves its record (`_audit`), and the record is written
once, in the boundary's `finally`, or when a stream ends (whole, stopped, broken or abandoned).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from .dialects import (
    CONTENT,
    OLLAMA,
    BadRequest,
    Route,
    blocked_message_response,
    blocked_message_stream,
    chunk_parts,
    tool_call_texts,
    with_text,
    with_tool_call_texts,
)
from .logs import audit_log, request_id, short_audit_record
from .relay import GuardedStream
from .requests import GuardedRequest
from .responses import (
    ClientGone,
    DisconnectWatch,
    decision_header,
    error_response,
    iter_list,
    make_response,
    raw_relay,
    scan_header,
    stream_response,
)
from .scanning import budget
from .scanning.engine import GuardUnavailable, Verdict
from .scanning.registry import new_vault
from .scanning.stream import StreamGuard
from .state import ProxyState
from .upstream import BROWSER_ONLY, Upstream, UpstreamError, forward_headers, response_headers

log = logging.getLogger("ollama_guard.app")

# Guarded routes ask Ollama for an uncompressed body (we parse it); these headers are ours, not Ollama's.
_DROP_GUARDED = frozenset({"accept-encoding", "authorization", "x-api-key", "cookie"}) | BROWSER_ONLY


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The whole request body. Raises BadRequest: 400 for a malformed Content-Length, 413 past `limit` bytes
    (declared or received), 408 when it has not all arrived within `timeout` seconds; ClientDisconnect when
    the client leaves while sending it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length")
        if int(declared) > limit:
            raise BadRequest(f"request body larger than {limit} bytes", 413, "body_too_large")
    # The server's `receive` read directly, under one timer: starlette's body stream and asyncio.timeout
    # were ~5 % of a cache hit's CPU, for a body that has nearly always arrived with the headers.
    receive = request.receive
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(timeout, expire)
    chunks, size = [], 0
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"request body larger than {limit} bytes", 413, "body_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:  # our own cancel, consumed here
            raise BadRequest("request body not received in time", 408, "body_timeout") from None
        raise
    finally:
        timer.cancel()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class GuardedRoutes:
    def __init__(self, state: ProxyState):
        self.st = state

    def _guard_headers(
        self, decision: str, fired: list[str], *groups: tuple[str, Sequence[Verdict]]
    ) -> list[tuple[bytes, bytes]]:
        """X-Guard-Decision, and with `scanners_header` on X-Guard-Scanners for `groups` when they scanned
        anything (ASGI raw pairs)."""
        _, value = decision_header(decision, sorted(set(fired)) if fired else [])
        out = [(b"x-guard-decision", value.encode("latin-1"))]
        if self.st.settings.scanners_header:
            sh = scan_header(*groups)
            if sh:
                out.append((b"x-guard-scanners", sh[1].encode("latin-1")))
        return out

    # -- guarded routes --
    def guarded(self, route: Route) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            state = request.scope.setdefault("state", {})
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
                self._audit_failure(request, 503, "error", missing=str(exc))
                return error_response(
                    route.dialect,
                    503,
                    f"guard not ready: required scanners missing ({exc})",
                    "guard_unavailable",
                    [decision_header("error", str(exc).split(", "))],
                )
            except Exception:
                # A fault of the guard itself: fail closed with a 503 in the dialect, never a bare 500.
                log.exception("guarded request failed")
                self._audit_failure(request, 503, "error", internal=True)
                return error_response(
                    route.dialect,
                    503,
                    "the guard failed on this request; it was not forwarded",
                    "guard_error",
                    [decision_header("error", [])],
                )
            finally:
                # The one audit point: the record the stages left, written once, whatever happened. A stream
                # that went out writes its own when it ends (whole, stopped, broken or abandoned).
                if not state.get("audit_deferred"):
                    self._write_audit(request)

        return handler

    async def _guarded(self, request: Request, route: Route) -> Response:
        st, s = self.st, self.st.settings
        assert st.engine is not None and st.validator is not None and st.upstream is not None
        raw = await read_body(request, s.limits.max_body_bytes, s.limits.body_read_timeout)
        req = st.validator.parse(raw, route)
        # The scan time this request may use, prompts and answer together (scanning/budget.py).
        budget.current_budget.set(budget.RequestBudget(s.limits.scan_budget_seconds))
        started = time.perf_counter()
        request.scope.setdefault("state", {})["guarded"] = (req, started)
        assert st.policy is not None
        if st.policy.missing_required():
            # Fail closed before anything is forwarded: a required guard is not there.
            raise GuardUnavailable(", ".join(x.name for x in st.policy.missing_required()))
        vault = new_vault() if st.policy.needs_vault() else None
        in_verdicts: list[Verdict] = []
        decision, fired = "allowed", []
        if s.enable_input_guard and st.engine.has_scanners("input") and req.targets:
            in_verdicts = await st.engine.scan_many("input", [t.text for t in req.targets], vault=vault)
            blocked = [v for v in in_verdicts if v.blocked]
            if blocked:
                places = [(t.where, t.role) for t, v in zip(req.targets, in_verdicts, strict=True) if v.blocked]
                return self._blocked(request, req, blocked, "input", started, places=places)
            for t, v in zip(req.targets, in_verdicts, strict=True):
                if v.sanitized:
                    t.set(v.text)
                    decision = "sanitized"
                fired.extend(v.fired)
        # Send what was read and scanned (mediation.py): the body as parsed, never the client's bytes.
        raw = orjson.dumps(req.body)
        headers = forward_headers(request.headers.items(), _DROP_GUARDED)
        headers.append(("Accept-Encoding", "identity"))
        query = request.scope.get("query_string", b"")
        path = request.scope["path"] + (f"?{query.decode('latin-1')}" if query else "")
        up_started = time.perf_counter()
        watch = DisconnectWatch(request.receive)
        try:
            resp = await watch.run(st.upstream.open("POST", path, headers, raw))
        except ClientGone:
            return self._client_gone(request, req, fired, in_verdicts, started)
        st.metrics.child(st.metrics.upstream_seconds, route.path).observe(time.perf_counter() - up_started)
        out_on = (
            s.enable_output_guard
            and st.engine.has_scanners("output")
            and route.kind in ("chat", "generate", "completion")
        )
        if req.stream and resp.status == 200 and resp.headers.get("Content-Encoding") is None:
            guard_headers = self._guard_headers(decision, fired, ("input", in_verdicts))
            up_headers = response_headers(resp.raw_headers)
            if not out_on:  # no output scanner: the stream is relayed as it comes (nothing to scan)
                self._audit(request, req, decision, fired, in_verdicts, [], resp.status, started, output_guard=False)
                return stream_response(raw_relay(resp), resp.status, up_headers + guard_headers, watch=watch)
            engine = st.engine
            relay: GuardedStream = GuardedStream(
                resp,
                route,
                lambda side: StreamGuard(engine, s, prompt=req.prompt, vault=vault, side=side),
                req.model,
                # The notice ending a stopped stream: always with `blocked_response: message`; in NDJSON also by
                # default (stream_stop_notice), for clients that show only text.
                s.answer_blocked_message
                if s.blocked_response == "message" or (s.stream_stop_notice and route.dialect == OLLAMA)
                else None,
                on_end=lambda v: self._stream_ended(request, req, v, relay, decision, fired, in_verdicts, started),
                on_abandon=lambda: self._stream_abandoned(request, req, fired, in_verdicts, started),
                read_timeout=st.upstream.read_timeout,
            )
            relay.notice_as_answer = s.blocked_response == "message"
            request.scope["state"]["audit_deferred"] = True  # written when the stream ends
            # The exchange's watch goes on watching for the client while the answer streams.
            return stream_response(relay.__aiter__(), resp.status, up_headers + guard_headers, watch=watch)
        try:
            body = await watch.run(Upstream.read(resp), last=True)
        except ClientGone:
            return self._client_gone(request, req, fired, in_verdicts, started)
        finally:
            resp.release()
        up_headers = response_headers(resp.raw_headers)
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
            return make_response(
                body, resp.status, up_headers + self._guard_headers(decision, fired, ("input", in_verdicts))
            )
        out_verdicts, answer = await self._scan_answer(route, obj, req.prompt, vault)
        blocked_out = [v for v in out_verdicts if v.blocked]
        if blocked_out:
            return self._blocked(request, req, blocked_out, "output", started, in_verdicts)
        for v in out_verdicts:
            fired.extend(v.fired)
        if answer is not obj:
            body = orjson.dumps(answer)
            decision = "sanitized"
        self._audit(request, req, decision, fired, in_verdicts, out_verdicts, 200, started)
        return make_response(
            body,
            200,
            up_headers + self._guard_headers(decision, fired, ("input", in_verdicts), ("output", out_verdicts)),
        )

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
            verdict = await self.st.engine.scan_window(self.st.engine.policy.side_output(), text, req.prompt, None)
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
        side = engine.policy.side_output()
        calls = tool_call_texts(route, obj) if side else []  # no scanner watches anything but the answer
        targets = [(ch, t) for ch, t in chunk_parts(route, obj) if ch == CONTENT or side]
        targets += [("tool", t) for t in calls if t]

        async def scan(channel: str, text: str) -> Verdict:
            if channel == CONTENT:
                return (await engine.scan_many("output", [text], prompt=prompt, vault=vault))[0]
            return await engine.scan_window(side, text, prompt, vault)

        if len(targets) == 1:  # the common case: no task for a gather of one
            verdicts = [await scan(*targets[0])]
        else:
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
        places: Sequence[tuple[str, str]] = (),
    ) -> Response:
        """The answer to a blocked prompt or answer. A blocked prompt names where it was blocked (the field and
        the message's role, never its text): a chat client that resends its history must tell its user which
        message to edit, or every later turn is refused with no hint why."""
        s = self.st.settings
        names = sorted({n for v in verdicts for n in (v.blocked_by or v.fired)})
        errored = any(v.error for v in verdicts) and not any(
            not r.valid and r.error is None and r.action == "block" for v in verdicts for r in v.results
        )
        over_budget = any(r.error == budget.BUDGET_ERROR for v in verdicts for r in v.results)
        decision = "error" if errored else "blocked"
        headers = self._guard_headers(decision, names, (direction, verdicts))
        message_mode = s.blocked_response == "message" and req.route.kind in ("chat", "generate", "completion")
        self._audit(
            request,
            req,
            decision,
            names,
            list(earlier) if direction == "output" else verdicts,
            verdicts if direction == "output" else [],
            413 if over_budget else 503 if errored else 200 if message_mode else 403,
            started,
        )
        if message_mode and not errored:
            text = s.blocked_message if direction == "input" else s.answer_blocked_message
            if req.stream:
                return stream_response(
                    iter_list(blocked_message_stream(req.route, req.model, text)),
                    200,
                    headers,
                    "application/x-ndjson" if req.route.dialect == OLLAMA else "text/event-stream",
                )
            return make_response(
                blocked_message_response(req.route, req.model, text),
                200,
                headers,
                "application/json",
            )
        if over_budget:
            return error_response(
                req.route.dialect,
                413,
                f"the {'prompt' if direction == 'input' else 'answer'} is more text than the guard can scan within "
                f"its budget ({s.limits.scan_budget_seconds:g} s of scanning per request); send less text",
                "scan_budget_exceeded",
                headers,
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
        where = ""
        if places:
            listed = "; ".join(
                f"{field} (role {role})" if role not in ("user", "") else field for field, role in places
            )
            where = f" Blocked: {listed}. Edit or remove that text to go on."
        return error_response(
            req.route.dialect,
            403,
            f"The {what} was blocked by the guard: {', '.join(names)}.{where}",
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
            self._write_audit(request)
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
        self._write_audit(request)

    def _client_gone(
        self, request: Request, req: GuardedRequest, fired: list[str], in_verdicts: list[Verdict], started: float
    ) -> Response:
        """The client left while Ollama was still answering: nobody to answer; recorded as 499."""
        self._audit(request, req, "client_closed", fired, in_verdicts, [], 499, started)
        return Response(status_code=499)

    def _stream_abandoned(
        self, request: Request, req: GuardedRequest, fired: list[str], in_verdicts: list[Verdict], started: float
    ) -> None:
        """The client left mid-stream (Open WebUI's Stop button): recorded all the same."""
        self._audit(request, req, "client_closed", fired, in_verdicts, [], 499, started, stream_abandoned=True)
        self._write_audit(request)

    def _write_audit(self, request: Request) -> None:
        """Write the request's audit record, once: the last one a stage left (`_audit`)."""
        record = request.scope.get("state", {}).pop("audit_record", None)
        if record is not None:
            audit_log.info("guarded request", extra={"audit": record, "request_id": request_id.get()})

    def _audit_failure(self, request: Request, status: int, decision: str, **extra: Any) -> None:
        """The audit record of a guarded request that ended in an exception (a 4xx before or after parsing,
        a 502/504, a client gone): one per request, like every other outcome."""
        guarded = request.scope.get("state", {}).get("guarded")
        if guarded is not None:
            req, started = guarded
            self._audit(request, req, decision, [], [], [], status, started, **extra)
            return
        if self.st.settings.logging.audit:
            record = short_audit_record(request.scope, request.url.path, decision, status, **extra)
            request.scope.setdefault("state", {})["audit_record"] = record

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
        # Kept, not written: `_write_audit` writes the request's one record (the boundary's `finally`, or the
        # stream's end); a later stage's record replaces an earlier one.
        request.scope.setdefault("state", {})["audit_record"] = record
