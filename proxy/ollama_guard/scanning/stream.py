"""Incremental output guard for streamed answers.

Text reaches the client only after every output scanner has passed it, and no text is scanned more than a
bounded number of times, so the scan work grows linearly with the answer (re-scanning the whole answer on
every chunk, as most proxies do, is quadratic).

Each scanner sees the stream in one of four modes:
- ``pattern`` (Secrets, BanSubstrings, Regex, InvisibleText ...): runs on each new stretch of at least
  ``stream.pattern_step`` characters together with the word still running and the ``overlap`` characters
  before it, so a match whose part before its last word is at most ``overlap`` characters is always seen
  whole, however the chunks split it. Of those, the running word and the last ``hold`` characters before it
  are held back. ``hold`` is ``overlap`` for every scanner but those that only ever rewrite or block on a
  match's last word (Secrets redacts a value, not its keyword): their keyword context may already be out when
  the value arrives; it is scanned with the value all the same. A rewrite that would change released text
  stops the stream instead.
- ``sentence`` (model scanners): runs on each run of newly completed sentences, with up to
  ``stream.sentence_context_chars`` characters of the text before as context; text is released once its
  sentence has passed. A stretch with no sentence end is cut at a space after 1024 characters.
- ``final`` (JSON, ReadingTime, TokenLimit ...): runs once on the whole answer at the end; it can only stop
  the end of a stream, since the rest was released already. Use ``buffer`` where that is not enough.
- ``buffer``: the whole answer is held back until it has passed.

Guarantees and limits are documented in docs/STREAMING.md.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from ..settings import Settings
from . import normalize
from .engine import ScanEngine, ScanResult, Verdict
from .policy import GuardScanner

_SENTENCE_END = re.compile(r"[.!?。！？][\"')\]]*\s|\n")
_SPACE = re.compile(r"\s")
MAX_SENTENCE_WINDOW = 1024
# A run of non-space characters longer than this is treated as text, not as one token, for hold-back.
MAX_WORD = 4096


@dataclass(slots=True)
class Step:
    release_to: int
    violation: Verdict | None = None


@dataclass(frozen=True, slots=True)
class _Layout:
    """A guard's scanners by stream mode, with their scan plans and hold-back: the same for every stream while
    the policy's loaded scanners stay the same, so worked out once per state of the policy (`_layout`)."""

    # Each group a guard scans with, by name, with its scan plan (ScanEngine.plan_of): "all", "pattern",
    # "sentence", "final" ("final" and "buffer" modes), and "buffered" (all of them in stream-mode order).
    groups: dict[str, tuple[list[GuardScanner], Any]]
    buffered: bool
    overlap: int
    hold: int


def _layout(engine: ScanEngine, side: bool, default_overlap: int) -> _Layout:
    views = engine.policy.views()
    key = ("stream layout", side, default_overlap)
    found = views.get(key)
    if found is not None:
        return found
    active = engine.policy.side_output() if side else engine.policy.active("output")
    pattern = [s for s in active if s.stream_mode == "pattern"]
    sentence = [s for s in active if s.stream_mode == "sentence"]
    final = [s for s in active if s.stream_mode in ("final", "buffer")]
    lists = {
        "all": active,
        "pattern": pattern,
        "sentence": sentence,
        "final": final,
        "buffered": pattern + sentence + final,
    }
    layout = _Layout(
        {name: (x, engine.plan_of(x)) for name, x in lists.items()},
        any(s.stream_mode == "buffer" for s in active),
        max((s.overlap(default_overlap) for s in pattern), default=0),
        max((s.hold(default_overlap) for s in pattern), default=0),
    )
    views[key] = layout
    return layout


class StreamGuard:
    """Decides how much of the streamed text may be released. Dialect-agnostic; one per run of one kind of
    text in a stream (the answer, or the model's thinking). A ``side`` guard watches text that is not the
    answer itself (thinking, tool-call arguments): every output scanner but the answer-only ones."""

    def __init__(self, engine: ScanEngine, settings: Settings, prompt: str = "", vault: Any = None, side: bool = False):
        self.engine = engine
        self.prompt = prompt
        self.vault = vault
        layout = _layout(engine, side, settings.stream.default_overlap)
        self._groups = groups = layout.groups
        self.scanners = groups["all"][0]
        self.pattern = groups["pattern"][0]
        self.sentence = groups["sentence"][0]
        self.final = groups["final"][0]
        self.buffered = layout.buffered
        self.overlap = layout.overlap
        self.hold = layout.hold
        self.step = settings.stream.pattern_step
        self.context = settings.stream.sentence_context_chars
        self.text = ""
        self.released = 0
        self.p_scanned = 0
        self._word_at: tuple[int, int] | None = None  # (p_scanned, where its running word starts)
        self._held_at: tuple[tuple[int, int], int] = ((-1, -1), 0)  # ((p_scanned, replacements), hold-back start)
        self.s_scanned = 0
        self.sanitized = False
        self.replacements = 0
        self.scanned_chars = 0  # total characters handed to scanners: the work, for tests and stats
        self.results: list[ScanResult] = []

    async def scan_whole(self, text: str) -> Verdict:
        """Every scanner of this guard on one complete text (a tool call's arguments), outside the stream."""
        return await self._run("all", text)

    async def _run(self, group: str, text: str) -> Verdict:
        """`text` scanned by one of the layout's groups of scanners (`_Layout.groups`)."""
        scanners, plan = self._groups[group]
        self.scanned_chars += len(text) * len(scanners)
        verdict = await self.engine.scan_window(scanners, text, self.prompt, self.vault, plan=plan)
        self.results.extend(verdict.results)
        return verdict

    @property
    def active(self) -> bool:
        return bool(self.pattern or self.sentence or self.final)

    def _limit(self) -> int:
        if self.buffered:
            return self.released
        limit = len(self.text)
        if self.pattern:
            # Where the hold-back starts moves only with a pattern scan or a rewrite; every chunk asks.
            key = (self.p_scanned, self.replacements)
            if self._held_at[0] != key:
                self._held_at = (key, normalize.back(self.text, self._running_word_start(), self.hold))
            limit = min(limit, self._held_at[1])
        if self.sentence:
            limit = min(limit, self.s_scanned)
        return max(self.released, limit)

    def append(self, delta: str) -> None:
        """Append `delta` without scanning (nothing more is released): for all but the last chunk of those that
        arrived together, which go out in one write anyway, so one scan at the last (`feed`) covers them all."""
        # Appended through a local holding the only reference, so CPython grows the string in place:
        # `self.text += delta` copies the whole answer on every chunk (1.1 s for a 256k-character answer).
        text = self.text
        self.text = ""
        text += delta
        self.text = text

    async def feed(self, delta: str, scan: bool = True) -> Step:
        """Append `delta`; scan what is due and return how far the text may be released. With `scan` False
        the text is only appended, as `append` does."""
        self.append(delta)
        return await self.advance() if scan else Step(self.released)

    def _pattern_due(self) -> bool:
        # The first pattern scan runs as soon as it can release something: a word ended after the first
        # `hold` characters. Scanning earlier would release nothing; waiting for a whole step delays the first
        # visible text (at ~30 tokens/s a 32-character step is ~0.25 s).
        if self.p_scanned:
            return len(self.text) - self.p_scanned >= self.step
        return len(self.text) > self.hold and _SPACE.search(self.text, self.hold) is not None

    def settle(self) -> int | None:
        """How far the text appended so far may be released when no scan is due (what `advance` would return,
        without a coroutine: most chunks of a stream bring no scan); None when one is due: call `advance`."""
        if self.buffered:
            return self.released
        if self.sentence or (self.pattern and self._pattern_due()):
            return None
        self.released = self._limit()
        return self.released

    async def advance(self) -> Step:
        """Scan what is due of the text appended so far and return how far it may be released."""
        if self.buffered:
            return Step(self.released)
        violation = None
        if self.pattern and self._pattern_due():
            violation = await self._scan_pattern()
        if violation is None and self.sentence:
            end = self._sentence_boundary()
            if end > self.s_scanned:
                violation = await self._scan_sentences(end)
        if violation is not None:
            return Step(self.released, violation)
        self.released = self._limit()
        return Step(self.released)

    async def finish(self) -> Step:
        """The upstream is done: scan what is left, run the whole-text scanners, release everything."""
        end = len(self.text)
        if self.buffered:
            # Everything was held back: one pass of every scanner over the whole answer.
            verdict = await self._scan("buffered", 0, end)
            if verdict is not None:
                return Step(self.released, verdict)
        else:
            if self.pattern and self.p_scanned < end:
                v = await self._scan_pattern()
                if v is not None:
                    return Step(self.released, v)
            if self.sentence and self.s_scanned < len(self.text):
                v = await self._scan_sentences(len(self.text))
                if v is not None:
                    return Step(self.released, v)
            if self.final:
                v = await self._scan("final", 0, len(self.text), sanitize_ok=False)
                if v is not None:
                    return Step(self.released, v)
        self.released = len(self.text)
        return Step(self.released)

    def _running_word_start(self) -> int:
        """Where the word still running at the scanned end starts (the scanned end itself after a space). A
        match is seen whole if what precedes its last word, separators included, is at most `overlap`
        characters: a token-shaped secret however long, with its keyword."""
        end = self.p_scanned
        if self._word_at is not None and self._word_at[0] == end:
            return self._word_at[1]  # unchanged since the last scan: every chunk asks, only a scan moves it
        start = end
        if end and not self.text[end - 1].isspace():
            floor = max(0, end - MAX_WORD)
            i = end
            while i > floor and not self.text[i - 1].isspace():
                i -= 1
            if i > floor or floor == 0:
                start = i
        self._word_at = (end, start)
        return start

    async def _scan_pattern(self) -> Verdict | None:
        # `overlap` counts the characters the scanners' normalised view keeps: hidden joiners between the
        # letters of a match widen the window, not shrink what it covers.
        start = normalize.back(self.text, self._running_word_start(), self.overlap)
        end = len(self.text)
        verdict = await self._scan("pattern", start, end)
        self.p_scanned = len(self.text)
        return verdict

    def _sentence_boundary(self) -> int:
        """End of the last complete sentence after s_scanned, or a cut for an over-long run."""
        tail = self.text[self.s_scanned :]
        last = -1
        for m in _SENTENCE_END.finditer(tail):
            last = m.end()
        if last > 0:
            return self.s_scanned + last
        if len(tail) >= MAX_SENTENCE_WINDOW:
            cut = tail.rfind(" ", 0, MAX_SENTENCE_WINDOW)
            return self.s_scanned + (cut + 1 if cut > 0 else MAX_SENTENCE_WINDOW)
        return self.s_scanned

    async def _scan_sentences(self, end: int) -> Verdict | None:
        start = max(0, self.s_scanned - self.context)
        # Context that was already released cannot be changed: sanitizing here would be too late.
        verdict = await self._scan("sentence", start, end, sanitize_ok=start >= self.released)
        self.s_scanned = end
        return verdict

    async def _scan(self, group: str, start: int, end: int, sanitize_ok: bool = True) -> Verdict | None:
        verdict = await self._run(group, self.text[start:end])
        if verdict.blocked:
            return verdict
        if verdict.sanitized:
            window = self.text[start:end]
            if not sanitize_ok or start + len(os.path.commonprefix((window, verdict.text))) < self.released:
                verdict.blocked = True  # released text cannot be unsent: stop rather than let it stand
                return verdict
            self._replace(start, end, verdict.text)
        return None

    def _replace(self, start: int, end: int, new: str) -> None:
        self._word_at = None
        delta = len(new) - (end - start)
        self.text = self.text[:start] + new + self.text[end:]
        self.sanitized = True
        self.replacements += 1
        if self.p_scanned >= end:
            self.p_scanned += delta
        if self.s_scanned >= end:
            self.s_scanned += delta
        elif self.s_scanned > start:
            self.s_scanned = start + len(new)
