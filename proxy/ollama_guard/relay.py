"""Relaying a streamed answer (Ollama NDJSON or OpenAI SSE) through the streaming guard.

While nothing was sanitized, chunks go out exactly as Ollama sent them, each once all of its text has passed.
Once a sanitizer changed the text, text goes out in chunks rebuilt from the last upstream chunk (every field
kept, the text replaced), and chunks without text (tool calls, the final `done` chunk) keep their place.
On a violation the upstream connection is closed (Ollama stops generating) and the stream ends with a
well-formed final chunk in the caller's dialect.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from .dialects import OLLAMA, Route, chunk_text, encode_ndjson, encode_sse, stopped_stream_tail, with_text
from .scanning.engine import Verdict
from .scanning.stream import StreamGuard

log = logging.getLogger(__name__)


async def iter_events(resp: aiohttp.ClientResponse, route: Route) -> AsyncIterator[tuple[bytes, Any]]:
    """(raw event bytes as they go to the client, parsed JSON or None) for each NDJSON line / SSE event."""
    if route.dialect == OLLAMA:
        async for line in resp.content:
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                obj = None
            yield (line if line.endswith(b"\n") else line + b"\n"), obj
        return
    async for line in resp.content:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, event names: we frame our own events
        payload = line[5:].strip()
        if payload == b"[DONE]":
            yield b"data: [DONE]\n\n", None
            continue
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            obj = None
        yield b"data: " + payload + b"\n\n", obj


@dataclass(slots=True)
class _Entry:
    raw: bytes
    end: int  # offset in the text where this chunk's text ends (markers: where they sit)


class GuardedStream:
    """Pulls the upstream stream, pushes text through a StreamGuard, yields what may reach the client."""

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        route: Route,
        guard: StreamGuard,
        model: str,
        blocked_message: str | None,
        on_end: Any = None,
    ):
        self.resp = resp
        self.route = route
        self.guard = guard
        self.model = model
        self.blocked_message = blocked_message
        self.on_end = on_end  # called once with the violation (or None) when the stream ends in full
        self.pending: deque[_Entry] = deque()
        self.offset = 0  # end of the text received so far (clean mode)
        self.sent = 0  # end of the text the client has
        self.rewrite = False
        self.seen_replacements = 0
        self.template: dict[str, Any] | None = None
        self.violation: Verdict | None = None

    def _encode(self, obj: Any) -> bytes:
        return encode_ndjson(obj) if self.route.dialect == OLLAMA else encode_sse(obj)

    def _text_chunk(self, start: int, end: int) -> bytes:
        tmpl = self.template or {"model": self.model}
        return self._encode(with_text(self.route, tmpl, self.guard.text[start:end]))

    def _sync_rewrite(self) -> None:
        """A sanitizer changed unreleased text: from now on text chunks are rebuilt from the guard's text.

        Queued text chunks are dropped (their text lives on in the guard); markers past what the client has
        move to the end of the current text, after the rewritten stretch.
        """
        if self.guard.replacements == self.seen_replacements:
            return
        self.seen_replacements = self.guard.replacements
        end = len(self.guard.text)
        kept: deque[_Entry] = deque()
        for e in self.pending:
            if isinstance(e, _Marker):
                kept.append(_Marker(e.raw, e.end if e.end <= self.sent else end))
        self.pending = kept
        self.rewrite = True

    def _release(self, upto: int) -> list[bytes]:
        out: list[bytes] = []
        while self.pending and self.pending[0].end <= upto:
            e = self.pending.popleft()
            if self.rewrite and e.end > self.sent:
                out.append(self._text_chunk(self.sent, e.end))
            out.append(e.raw)
            self.sent = max(self.sent, e.end)
        if self.rewrite and upto > self.sent:
            out.append(self._text_chunk(self.sent, upto))
            self.sent = upto
        return out

    async def __aiter__(self) -> AsyncIterator[bytes]:
        done = False
        try:
            async for raw, obj in iter_events(self.resp, self.route):
                text = chunk_text(self.route, obj) if obj is not None else None
                if isinstance(obj, dict) and "error" not in obj:
                    self.template = obj
                if text is None:
                    pos = len(self.guard.text) if self.rewrite else self.offset
                    self.pending.append(_Marker(raw, pos))
                    step = await self.guard.feed("")
                else:
                    if not self.rewrite:
                        self.offset += len(text)
                        self.pending.append(_Entry(raw, self.offset))
                    step = await self.guard.feed(text)
                if step.violation is not None:
                    self.violation = step.violation
                    break
                self._sync_rewrite()
                for piece in self._release(step.release_to):
                    yield piece
            if self.violation is None:
                step = await self.guard.finish()
                if step.violation is not None:
                    self.violation = step.violation
                else:
                    self._sync_rewrite()
                    for piece in self._release(step.release_to):
                        yield piece
                    while self.pending:  # markers after the last text, in order
                        yield self.pending.popleft().raw
                    if self.on_end is not None:
                        self.on_end(None)
            if self.violation is not None:
                self.resp.close()  # closes the connection: Ollama stops generating
                if self.on_end is not None:
                    self.on_end(self.violation)
                for piece in stopped_stream_tail(
                    self.route,
                    self.template,
                    self.model,
                    self.violation.blocked_by or self.violation.fired,
                    self.blocked_message,
                ):
                    yield piece
            done = self.violation is None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("upstream stream broke: %s", type(exc).__name__)
            self.resp.close()
            yield from_broken_stream(self.route, self.template, self.model)
        finally:
            # Cut short (client gone, violation, error): close the connection so Ollama stops generating.
            self.resp.release() if done else self.resp.close()


@dataclass(slots=True)
class _Marker(_Entry):
    """A chunk without answer text."""


def from_broken_stream(route: Route, template: dict[str, Any] | None, model: str) -> bytes:
    """Ollama went away mid-stream: end the stream well-formed, saying so."""
    if route.dialect == OLLAMA:
        return encode_ndjson({"error": "upstream stream ended unexpectedly"})
    return (
        encode_sse(
            {
                "error": {
                    "message": "upstream stream ended unexpectedly",
                    "type": "upstream_error",
                    "param": None,
                    "code": "upstream_error",
                }
            }
        )
        + b"data: [DONE]\n\n"
    )
