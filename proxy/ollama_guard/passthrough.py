"""The pass-through stage: the read-only routes Ollama answers as it is (tags, show, ps, version, models),
and model management when it is allowed. Only the routes named here are ever forwarded, never a path that
normalises to another one."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .dialects import OLLAMA, BadRequest
from .pipeline import read_body
from .responses import dialect_of, error_response, raw_relay, stream_response
from .state import ProxyState
from .upstream import BROWSER_ONLY, UpstreamError, forward_headers, response_headers

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

_DROP_AUTH = frozenset({"authorization", "x-api-key"})


class PassThrough:
    def __init__(self, state: ProxyState):
        self.st = state

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
        drop = BROWSER_ONLY | (_DROP_AUTH if st.settings.auth.enabled else frozenset())
        headers = forward_headers(request.headers.items(), drop)
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        resp = await st.upstream.open(request.method, path, headers, body)
        return stream_response(raw_relay(resp), resp.status, response_headers(resp.raw_headers))
