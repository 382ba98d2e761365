"""Relaying a streamed answer (Ollama NDJSON or OpenAI SSE) through the streaming guard.

While nothing was sanitized, chunks go out exactly as Ollama sent them, each once all of its text has passed.
Once a sanitizer changed the text, text goes out in chunks rebuilt from the stream's identity fields (model,
id, created) with the text replaced, and chunks without text (the final `done` chunk) keep their place.
Thinking is guarded like the answer, by its own guard; tool calls are scanned whole before they go out.
On a violation the upstream connection is closed (Ollama stops generating) and the stream ends with a
well-formed final chunk in the caller's dialect.

Every upstream event is parsed and scanned, or it ends the stream: a line that is not a JSON object, an
`error` event (its text scanned like any output before the client sees it) and a stream that ends without
its final event (`done: true`, `data: [DONE]`) all end the stream with the dialect's error ending, after
the text that had passed.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError

from .dialects import (
    CONTENT,
    OLLAMA,
    Route,
    answer_text_reader,
    encode_ndjson,
    encode_sse,
    split_parts,
    stopped_stream_tail,
    text_template,
    tool_call_texts,
    with_text,
    with_tool_call_texts,
)
from .scanning.engine import ScanResult, Verdict
from .scanning.stream import StreamGuard
from .upstream import StallWatch

log = logging.getLogger(__name__)


DONE = object()  # the SSE stream's closing `data: [DONE]`
# The longest stream line read: a final /api/generate chunk carries the whole `context` token array (about
# 7 bytes a token); a longer line ends the stream with an error rather than the connection.
MAX_LINE_BYTES = 16 * 1024 * 1024


class LineSplitter:
    """Cuts a stream's bytes into lines (each with its newline; the last of the stream may lack one), one list per
    read from the network: what arrived together is relayed together, in one write."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []  # the line still arriving, in pieces (joined once: no quadratic copying)
        self.size = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines `chunk` completes. Raises ValueError for a line over MAX_LINE_BYTES."""
        lines = chunk.split(b"\n")  # split in C: a read carries hundreds of short lines from a fast model
        tail = lines.pop()  # what follows the last newline: the start of a line still arriving
        parts = self.parts
        if lines and parts:
            parts.append(lines[0])
            lines[0] = b"".join(parts)
            parts = self.parts = []
            self.size = 0
        if tail:
            parts.append(tail)
            self.size += len(tail)
            if self.size > MAX_LINE_BYTES:
                raise ValueError(f"a stream line over {MAX_LINE_BYTES} bytes")
        return [line + b"\n" for line in lines]

    def end(self) -> list[bytes]:
        """The stream ended: its last line if it lacked a newline."""
        return [b"".join(self.parts)] if self.parts else []


def is_event(line: bytes, ollama: bool) -> bool:
    """Whether a stream line carries an event: an NDJSON line that is not blank, an SSE `data:` line (blank
    separators, comments and event names carry none: we frame our own events)."""
    if ollama:
        return bool(line) and not line.isspace()
    return line.lstrip().startswith(b"data:")


def parse_event(line: bytes, ollama: bool) -> tuple[bytes, Any]:
    """An event line (`is_event`) as (its bytes as they go to the client, its parsed JSON: None when it is not
    JSON, DONE for SSE's `data: [DONE]`)."""
    if ollama:
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            obj = None
        return (line if line.endswith(b"\n") else line + b"\n"), obj
    payload = line.strip()[5:].strip()
    if payload == b"[DONE]":
        return b"data: [DONE]\n\n", DONE
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        obj = None
    return b"data: " + payload + b"\n\n", obj


@dataclass(slots=True)
class _Entry:
    raw: bytes
    end: int  # offset in the text where this chunk's text ends (markers: where they sit)


@dataclass(slots=True)
class _Marker(_Entry):
    """A chunk without text of its segment's kind."""


class _Segment:
    """One run of one kind of text (thinking or content) through its own StreamGuard, with the chunks
    waiting for their text to pass."""

    __slots__ = ("kind", "guard", "pending", "offset", "sent", "rewrite", "seen_replacements")

    def __init__(self, kind: str, guard: StreamGuard):
        self.kind = kind
        self.guard = guard
        self.pending: deque[_Entry] = deque()
        self.offset = 0  # end of the text received so far (clean mode)
        self.sent = 0  # end of the text the client has
        self.rewrite = False
        self.seen_replacements = 0


class GuardedStream:
    """Pulls the upstream stream, pushes its text through StreamGuards, yields what may reach the client.

    The answer and the model's thinking each get their own guard, one after the other, in stream order: when
    the kind of text changes, the run before is finished (all its scans done, all of it released) before the
    next begins. Tool calls are scanned whole, in place, after the text before them has passed.
    """

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        route: Route,
        new_guard: Callable[[bool], StreamGuard],
        model: str,
        notice: str | None,
        on_end: Any = None,
        on_abandon: Any = None,
        read_timeout: float | None = None,
    ):
        self.resp = resp
        self.read_timeout = read_timeout  # seconds Ollama may stay silent mid-stream (upstream.StallWatch)
        self.route = route
        self.new_guard = new_guard  # new_guard(side) -> a fresh StreamGuard
        self.model = model
        self.notice = notice  # the text that ends a stopped stream (None: none)
        self.notice_as_answer = False  # SSE: the notice as the answer's end (blocked_response: message)
        self.on_end = on_end  # called once with the violation (or None) when the stream ends in full
        self.on_abandon = on_abandon  # called instead when the client leaves before the end
        self.reported = False
        self._ollama = route.dialect == OLLAMA
        self._answer_text = answer_text_reader(route)
        self.guards: list[StreamGuard] = []
        self.seg = self._segment(CONTENT)
        self.last: dict[str, Any] = {}  # the last upstream chunk: where rebuilt chunks take model, id, created
        self.tools_sanitized = False
        self.violation: Verdict | None = None
        self.ended = False  # the upstream's final event (done: true / [DONE]) arrived
        self.broken: str | None = None  # why the stream cannot go on (unreadable or error event)

    # ---- what the audit record reads -------------------------------------------------------------------
    @property
    def results(self) -> list[ScanResult]:
        return [r for g in self.guards for r in g.results]

    @property
    def sanitized(self) -> bool:
        return self.tools_sanitized or any(g.sanitized for g in self.guards)

    @property
    def scanned_chars(self) -> int:
        return sum(g.scanned_chars for g in self.guards)

    # ---- segments ----------------------------------------------------------------------------------------
    def _guard(self, side: bool) -> StreamGuard:
        guard = self.new_guard(side)
        self.guards.append(guard)  # every guard's results go into the audit record
        return guard

    def _segment(self, kind: str) -> _Segment:
        return _Segment(kind, self._guard(kind != CONTENT))

    def _encode(self, obj: Any) -> bytes:
        return encode_ndjson(obj) if self.route.dialect == OLLAMA else encode_sse(obj)

    def _text_chunk(self, seg: _Segment, start: int, end: int) -> bytes:
        tmpl = text_template(self.route, self.last, self.model)
        return self._encode(with_text(self.route, tmpl, seg.guard.text[start:end], seg.kind))

    def _sync_rewrite(self, seg: _Segment) -> None:
        """A sanitizer changed unreleased text (`_release` saw the guard's replacements grow): from now on text
        chunks are rebuilt from the guard's text.

        Queued text chunks are dropped (their text lives on in the guard); markers past what the client has
        move to the end of the current text, after the rewritten stretch.
        """
        seg.seen_replacements = seg.guard.replacements
        end = len(seg.guard.text)
        kept: deque[_Entry] = deque()
        for e in seg.pending:
            if isinstance(e, _Marker):
                kept.append(_Marker(e.raw, e.end if e.end <= seg.sent else end))
        seg.pending = kept
        seg.rewrite = True

    def _release(self, seg: _Segment, upto: int) -> list[bytes]:
        if seg.guard.replacements != seg.seen_replacements:
            self._sync_rewrite(seg)
        out: list[bytes] = []
        while seg.pending and seg.pending[0].end <= upto:
            e = seg.pending.popleft()
            if seg.rewrite and e.end > seg.sent:
                out.append(self._text_chunk(seg, seg.sent, e.end))
            out.append(e.raw)
            seg.sent = max(seg.sent, e.end)
        if seg.rewrite and upto > seg.sent:
            out.append(self._text_chunk(seg, seg.sent, upto))
            seg.sent = upto
        return out

    def _queue(self, raw: bytes, text: str) -> None:
        """One chunk into the current segment, its text (or none, for a marker) appended unscanned: for all but
        the last chunk of a network read, whose scan (`_feed`) covers them all."""
        seg = self.seg
        if not text:
            seg.pending.append(_Marker(raw, len(seg.guard.text) if seg.rewrite else seg.offset))
            return
        if not seg.rewrite:
            seg.offset += len(text)
            seg.pending.append(_Entry(raw, seg.offset))
        seg.guard.append(text)

    async def _feed(self, raw: bytes, text: str, scan: bool = True) -> list[bytes]:
        """One chunk into the current segment: its text (or none, for a marker). Sets violation on a stop.
        `scan` False: as `_queue`."""
        self._queue(raw, text)
        if not scan:
            return []
        seg = self.seg
        upto = seg.guard.settle()
        if upto is not None:  # nothing to scan yet
            return self._release(seg, upto)
        step = await seg.guard.advance()
        if step.violation is not None:
            self.violation = step.violation
            return []
        return self._release(seg, step.release_to)

    async def _finish(self) -> list[bytes]:
        """The current segment's text is complete: its last scans, then all of it and its markers."""
        seg = self.seg
        step = await seg.guard.finish()
        if step.violation is not None:
            self.violation = step.violation
            return []
        out = self._release(seg, step.release_to)
        out.extend(e.raw for e in seg.pending)  # markers after the last text, in order
        seg.pending.clear()
        return out

    async def _switch(self, kind: str) -> list[bytes]:
        """Text of another kind begins: finish the run before (if it had text) and start a fresh guard."""
        if self.seg.kind == kind:
            return []
        if not self.seg.guard.text:
            pending = self.seg.pending
            self.seg = self._segment(kind)
            self.seg.pending = pending  # markers only, all at offset 0: they go out with the next release
            return []
        out = await self._finish()
        if self.violation is None:
            self.seg = self._segment(kind)
        return out

    async def _tools(self, obj: dict[str, Any], raw: bytes) -> list[bytes]:
        """A chunk with tool calls: the text before it passes first, then each call's arguments, whole."""
        out = await self._finish()
        if self.violation is not None:
            return []
        guard = self._guard(side=True)
        texts = tool_call_texts(self.route, obj)
        verdicts = [await guard.scan_whole(t) if t else None for t in texts]
        for v in verdicts:
            if v is not None and v.blocked:
                self.violation = v
                return out  # the text before the call passed; the call does not go out
        if any(v is not None and v.sanitized for v in verdicts):
            new = with_tool_call_texts(
                self.route, obj, [v.text if v is not None else t for v, t in zip(verdicts, texts, strict=True)]
            )
            if new is None:  # the sanitized arguments no longer parse: the call cannot be sent
                bad = next(v for v in verdicts if v is not None and v.sanitized)
                bad.blocked = True
                self.violation = bad
                return out
            raw = self._encode(new)
            self.tools_sanitized = True
        out.append(raw)
        self.seg = self._segment(self.seg.kind)
        return out

    def _report(self, violation: Verdict | None) -> None:
        if not self.reported and self.on_end is not None:
            self.reported = True
            self.on_end(violation)

    # ---- the stream --------------------------------------------------------------------------------------
    async def _upstream_error(self, error: Any) -> str:
        """The text of an upstream error event, as the client may see it: scanned like any output."""
        text = error.get("message") if isinstance(error, dict) else error
        text = str(text)[:2000]
        verdict = await self._guard(side=True).scan_whole(text)
        if verdict.blocked:
            return "Ollama reported an error; its text was withheld by the guard"
        return f"Ollama reported an error: {verdict.text if verdict.sanitized else text}"

    def _plain(self, obj: Any) -> str | None:
        """The text of the stream's common event, a chunk of the current run with only answer text or no text
        at all ("" then), taken in as `_event` would; None for any other event, which is left to `_event`."""
        if type(obj) is not dict or obj.get("error") is not None:
            return None
        text = self._answer_text(obj)
        if text is None or (text and self.seg.kind != CONTENT):
            return None
        self._take(obj)
        return text

    def _take(self, obj: dict[str, Any]) -> None:
        """A readable event arrived: the end of an Ollama stream (`done: true`), and the chunk rebuilt ones copy."""
        if self._ollama and obj.get("done") is True:
            self.ended = True
        self.last = obj

    async def _event(self, raw: bytes, obj: Any, scan: bool = True) -> list[bytes]:
        """What one upstream event releases: only text that passed, even when a violation stops the stream.
        `scan` False for all but the last event of a network read: their text is scanned with the last's."""
        if obj is DONE:
            self.ended = True
            return await self._feed(raw, "", scan)
        if not isinstance(obj, dict):
            self.broken = "Ollama sent a stream event the guard cannot read"
            return []
        if obj.get("error") is not None:
            self.broken = await self._upstream_error(obj["error"])
            return []
        self._take(obj)
        parts = split_parts(self.route, obj)
        out: list[bytes] = []
        for kind, text, part in parts:
            part_raw = raw if len(parts) == 1 else self._encode(part)
            if kind == "tools":
                out += await self._tools(part, part_raw)
            elif kind:
                if kind != self.seg.kind:
                    out += await self._switch(kind)
                if self.violation is None:
                    out += await self._feed(part_raw, text, scan)
            else:
                out += await self._feed(part_raw, "", scan)
            if self.violation is not None:
                break
        return out

    async def __aiter__(self) -> AsyncIterator[bytes]:
        done = False
        # Until the first text goes out, every event is scanned as it comes and what it releases is written at
        # once: a fast model's first read carries dozens of chunks, and the client should not wait for all
        # of them to be read and scanned before it sees the first word.
        first = True
        stall = StallWatch(self.resp, self.read_timeout) if self.read_timeout else None
        try:
            ollama = self._ollama
            splitter = LineSplitter()
            content = self.resp.content
            ended = False
            while not ended:
                # readany, not `async for ... iter_any()` under a generator of lines: one frame fewer to pass per
                # network read, and a stream is read in thousands of them.
                if stall is not None:
                    stall.since = stall.loop.time()  # a wait for Ollama begins
                chunk = await content.readany()
                if stall is not None:
                    stall.since = None
                ended = not chunk
                lines = splitter.end() if ended else splitter.feed(chunk)
                out: list[bytes] = []
                # What arrived together goes out together: its text is scanned once, at its last event. Each
                # line is parsed as its turn comes, so the first release does not wait for the whole read.
                last = len(lines) - 1
                while last >= 0 and not is_event(lines[last], ollama):
                    last -= 1
                for i in range(last + 1):
                    line = lines[i]
                    if i != last and not is_event(line, ollama):
                        continue
                    raw, obj = parse_event(line, ollama)
                    text = self._plain(obj)
                    scan = first or i == last
                    if text is None:
                        out.extend(await self._event(raw, obj, scan))
                    elif not scan:
                        self._queue(raw, text)  # no coroutine for all but the last
                        continue
                    else:
                        out.extend(await self._feed(raw, text))
                    if self.violation is not None or self.broken is not None:
                        break
                    if first and out and i != last:
                        first = self.seg.sent == 0  # only chunks without text went: the first word is still to come
                        yield b"".join(out)
                        out = []
                if out:
                    first = self.seg.sent == 0
                    yield b"".join(out)  # what arrived together goes out in one write
                if self.violation is not None or self.broken is not None:
                    break
            if self.broken is None and not self.ended and self.violation is None:
                self.broken = "Ollama's stream ended before its final event"
            if self.violation is None:
                pieces = await self._finish()
                if self.violation is None:
                    if self.broken is not None:
                        log.warning("upstream stream unusable: %s", self.broken.split(":")[0])
                        self.resp.close()
                        pieces.append(from_broken_stream(self.route, self.last, self.model, self.broken))
                    if pieces:
                        yield b"".join(pieces)  # the stream's end in one write
                    self._report(None)
            if self.violation is not None:
                self.resp.close()  # closes the connection: Ollama stops generating
                self._report(self.violation)
                yield b"".join(
                    stopped_stream_tail(
                        self.route,
                        self.last,
                        self.model,
                        self.violation.blocked_by or self.violation.fired,
                        self.notice,
                        as_answer=self.notice_as_answer,
                    )
                )
            done = self.violation is None and self.broken is None
        except (aiohttp.ClientError, TimeoutError, ValueError, HttpProcessingError) as exc:
            # A reset, a stall past the read timeout, a line over MAX_LINE_BYTES (LineTooLong)
            log.warning("upstream stream broke: %s", type(exc).__name__)
            # aiohttp keeps the error on the body's reader, and its traceback holds this frame, which holds the
            # reader: a reference cycle, left to the garbage collector, unless the traceback goes.
            exc.__traceback__ = None
            self.resp.close()
            self._report(None)
            yield from_broken_stream(self.route, self.last, self.model)
        finally:
            if stall is not None:
                stall.close()
            if not self.reported and self.on_abandon is not None:
                self.reported = True
                self.on_abandon()  # the client left (Open WebUI's Stop button): recorded all the same
            # The callbacks close over this stream (the pipeline's record of it): dropped once called, so the
            # stream, its upstream response and its request are freed when it ends, not at the next collection
            # of the garbage collector's cycles.
            self.on_end = self.on_abandon = None
            # Cut short (client gone, violation, error): close the connection so Ollama stops generating.
            self.resp.release() if done else self.resp.close()


def from_broken_stream(
    route: Route, template: dict[str, Any] | None, model: str, message: str = "upstream stream ended unexpectedly"
) -> bytes:
    """Ollama went away mid-stream, or sent what cannot be relayed: end the stream well-formed, saying so."""
    if route.dialect == OLLAMA:
        return encode_ndjson({"error": message})
    return (
        encode_sse(
            {
                "error": {
                    "message": message,
                    "type": "upstream_error",
                    "param": None,
                    "code": "upstream_error",
                }
            }
        )
        + b"data: [DONE]\n\n"
    )
