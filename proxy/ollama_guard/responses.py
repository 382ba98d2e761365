"""Responses in the caller's dialect, and the streaming response that notices a client going away.

Every answer the proxy writes itself goes through `error_response` or `make_response`; every stream through
`stream_response`. Shared by all the request stages (gate, pipeline, pass-through, ops, admin).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .dialects import OLLAMA, OPENAI, error_body
from .scanning.engine import Verdict


def dialect_of(path: str) -> str:
    return OPENAI if path.startswith("/v1/") else OLLAMA


def _raw_headers(headers: Sequence[tuple[str, str] | tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """ASGI's raw headers (lower-case latin-1 bytes) from (name, value) pairs given as str, or as raw bytes already
    (Ollama's headers, the guard's own: passed as they are)."""
    return [h if type(h[0]) is bytes else (h[0].lower().encode("latin-1"), h[1].encode("latin-1")) for h in headers]  # type: ignore[union-attr,misc]


class _Prepared(Response):
    """A whole body and its final headers, sent as two ASGI messages: starlette's Response normalises
    headers and checks for background tasks on every answer, ~9 % of a cache hit's CPU."""

    def __init__(self, body: bytes, status: int, raw_headers: list[tuple[bytes, bytes]]) -> None:
        self.body = body
        self.status_code = status
        self.raw_headers = raw_headers
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})


def make_response(
    body: bytes, status: int, headers: Sequence[tuple[str, str] | tuple[bytes, bytes]], media_type: str | None = None
) -> Response:
    """`body` with `headers` (str or raw pairs; a `media_type` replaces any Content-Type among them); Content-Length
    set."""
    raw = [(b"content-length", b"%d" % len(body))]
    if media_type is None:
        raw += [h for h in _raw_headers(headers) if h[0] != b"content-length"]
    else:
        raw.append((b"content-type", media_type.encode("latin-1")))
        raw += [h for h in _raw_headers(headers) if h[0] != b"content-length" and h[0] != b"content-type"]
    return _Prepared(body, status, raw)


def error_response(
    dialect: str, status: int, message: str, code: str, extra: Sequence[tuple[str, str] | tuple[bytes, bytes]] = ()
) -> Response:
    etype = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "api_error"
    )
    return make_response(error_body(dialect, message, code, etype), status, list(extra), "application/json")


def decision_header(decision: str, scanners: list[str]) -> tuple[str, str]:
    return ("X-Guard-Decision", f"{decision}; scanners={','.join(scanners)}" if scanners else decision)


def scan_header(*groups: tuple[str, Sequence[Verdict]]) -> tuple[str, str] | None:
    """`X-Guard-Scanners: input:Secrets;score=1.00;ms=2.9, ...`: per scanner, the top score and total time."""
    pieces: list[str] = []
    for direction, verdicts in groups:
        # One verdict per text: a conversation's history brings dozens, each with a result per scanner.
        scores: dict[str, float] = {}
        times: dict[str, float] = {}
        for v in verdicts:
            for r in v.results:
                n = r.scanner
                top = scores.get(n)
                if top is None:
                    scores[n] = r.score
                    times[n] = r.ms
                    continue
                if r.score > top:
                    scores[n] = r.score
                times[n] += r.ms
        for n, score in scores.items():
            tenths = int(times[n] * 10.0 + 0.5)  # ms to one decimal, rounded half up
            key = (direction, n, score, tenths)
            piece = _PIECES.get(key)
            if piece is None:
                piece = f"{direction}:{n};score={score:.2f};ms={tenths // 10}.{tenths % 10}"
                if len(_PIECES) >= 4096:
                    _PIECES.clear()
                _PIECES[key] = piece
            pieces.append(piece)
    return ("X-Guard-Scanners", ", ".join(pieces)) if pieces else None


# X-Guard-Scanners' pieces as formatted: most repeat (a cached verdict's, a short text's scan time), and
# formatting two floats took longer than the scan of a short text.
_PIECES: dict[tuple[str, str, float, int], str] = {}


class ClientGone(Exception):
    """The client went away while Ollama was answering."""


class DisconnectWatch:
    """Watches for the client (on the request's ASGI `receive`) during the steps of the upstream exchange or
    of a streamed answer (`run`): a client that goes away during a step cancels it (aiohttp then closes the
    upstream connection, and Ollama stops generating) and the step raises ClientGone.

    The watcher task starts only once the exchange has taken `AFTER` seconds: most answers (a cache hit, an
    embedding, a refusal) come sooner, and a task per request cost ~5 % of a cache hit's CPU; a client that
    left earlier is noticed then. Only one task may read the request's `receive`: `close()` before a
    streaming response, which watches for the client with a watch of its own."""

    AFTER = 0.1  # seconds: how late a departure may be noticed, against a task for every request

    __slots__ = ("receive", "task", "watcher", "timer", "active", "gone")

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.task: asyncio.Task[Any] | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.active = False
        self.gone = False

    async def run(self, work: Awaitable[Any], last: bool = False) -> Any:
        """`await work`; raises ClientGone if the client left before or while it ran. Closes the watch when
        `work` raises, or after it when `last`."""
        if self.task is None:
            self.task = asyncio.current_task()
            self.timer = asyncio.get_running_loop().call_later(self.AFTER, self._start)
        try:
            if self.gone:
                raise ClientGone
            self.active = True
            try:
                result = await work
            except asyncio.CancelledError:
                assert self.task is not None
                # Our own cancel is consumed here; one from elsewhere (shutdown) goes on.
                if not self.gone or self.task.uncancel() > 0:
                    raise
                raise ClientGone from None
            finally:
                self.active = False
        except BaseException:
            self.close()
            if asyncio.iscoroutine(work):
                work.close()
            raise
        if last:
            self.close()
        return result

    def _start(self) -> None:
        self.timer = None
        self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        await wait_disconnect(self.receive)
        self.gone = True
        if self.active and self.task is not None:
            self.task.cancel()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.watcher is not None:
            self.watcher.cancel()


async def wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def raw_relay(resp: Any) -> Any:
    done = False
    try:
        async for chunk in resp.content.iter_any():
            yield chunk
        done = True
    finally:
        # Cut short (client gone, error): close the connection so Ollama stops; else back to the pool.
        resp.release() if done else resp.close()


async def iter_list(items: list[bytes]) -> Any:
    for item in items:
        yield item


class _Streamed(Response):
    """A streamed body: the start, then each chunk `body` yields, sent in the request's task while watching for the
    client to go away, whatever ASGI spec version the server speaks.

    Starlette relies on `send` raising once the client is gone (ASGI >= 2.4), but a server may drop writes to
    a closed connection silently, and a guarded stream would then pull Ollama's whole answer for nobody.
    Cancelling the body iterator runs its `finally`, which closes the upstream connection. (Not starlette's
    StreamingResponse: its headers normalisation and its per-chunk type check ran on every stream; an anyio
    task group took two tasks and a cancel scope per stream, on the way to its first chunk.)
    """

    def __init__(
        self,
        body: AsyncIterator[bytes],
        status: int,
        raw_headers: list[tuple[bytes, bytes]],
        watch: DisconnectWatch | None = None,
    ) -> None:
        self.body_iterator = body
        self.status_code = status
        self.raw_headers = raw_headers
        self.background = None
        self.watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch = self.watch
        if watch is None or watch.gone:
            # A client that left before the stream began: the stream still starts, so that its body iterator's
            # `finally` runs (it closes the upstream connection and records the abandoned stream).
            watch = DisconnectWatch(receive)
        try:
            await watch.run(self._send_all(send), last=True)
        except ClientGone:
            pass  # the body iterator's `finally` closed the upstream connection; nobody to send to

    async def _send_all(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def stream_response(
    gen: AsyncIterator[bytes],
    status: int,
    headers: Sequence[tuple[str, str] | tuple[bytes, bytes]],
    media_type: str | None = None,
    watch: DisconnectWatch | None = None,
) -> Response:
    """`gen`'s chunks as a streamed body with `headers` (str or raw pairs; a `media_type` replaces any Content-Type
    among them). `watch`: the request's DisconnectWatch of the upstream exchange, which goes on watching for the
    client while the body streams (one watch, one timer, per request); without it the response makes its own."""
    raw = _raw_headers(headers)
    if media_type is not None:
        raw = [(b"content-type", media_type.encode("latin-1"))] + [h for h in raw if h[0] != b"content-type"]
    return _Streamed(gen, status, raw, watch)
