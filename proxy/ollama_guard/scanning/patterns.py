"""BanSubstrings and Regex that also match what the text says once normalised (scanning/normalize.py).

llm-guard's scanners match the raw text, lower-cased at most: `ｑｕｏｋｋａｆｉｒｅ`, `quo\u200dkkafire` or
`quоkkafire` (a Cyrillic `о`) pass a ban on "quokkafire", though a model reads each as the banned word.
Each scanner here runs llm-guard's own scan first (its semantics and its redaction, unchanged), then matches
the same substrings or expressions on the normalised view of the result, and treats a match there as a match:
it blocks, or with `redact` rewrites exactly the original characters the match came from to `[REDACTED]`.

- BanSubstrings: substrings are normalised like the text; case folding when `case_sensitive` is false
  (llm-guard's default). `match_type: word` keeps its `\\b...\\b` rule on the view.
- Regex (blocking patterns): expressions run on the view without case folding (they may be case-sensitive:
  `[A-Z]`), so look-alikes, fullwidth forms and hidden joiners are undone, case is kept. Allow-list patterns
  (`is_blocked: false`) keep llm-guard's behaviour on the raw text only.
"""

from __future__ import annotations

import re

from llm_guard.input_scanners.ban_substrings import BanSubstrings as _BanSubstrings
from llm_guard.input_scanners.ban_substrings import MatchType as _SubstringMatch
from llm_guard.input_scanners.regex import Regex as _Regex

from . import normalize

REDACTED = "[REDACTED]"


class BanSubstrings(_BanSubstrings):
    def __init__(self, substrings: list[str], **kwargs: object) -> None:
        super().__init__(substrings, **kwargs)  # type: ignore[arg-type]
        fold = not self._case_sensitive
        self._fold = fold
        self._needles = [normalize.view(s, fold=fold).text for s in substrings]
        word = self._match_type == _SubstringMatch.WORD
        self._exprs = [re.compile(r"\b" + re.escape(n) + r"\b" if word else re.escape(n)) for n in self._needles if n]

    def scan(self, prompt: str) -> tuple[str, bool, float]:
        out, valid, score = super().scan(prompt)
        if not valid and not self._redact:
            return out, valid, score
        if out.isascii():
            return out, valid, score  # the view adds nothing llm-guard did not see: not built
        v = normalize.view(out, fold=self._fold)
        found = [list(e.finditer(v.text)) for e in self._exprs]
        if self._contains_all:
            if not all(found):
                return out, valid, score
        elif not any(found):
            return out, valid, score
        if self._redact:
            return v.rewrite((m.span() for ms in found for m in ms), lambda _: REDACTED), False, 1.0
        return prompt, False, 1.0


class Regex(_Regex):
    def scan(self, prompt: str) -> tuple[str, bool, float]:
        out, valid, score = super().scan(prompt)
        if not self._is_blocked or (not valid and not self._redact):
            return out, valid, score
        if out.isascii():
            return out, valid, score
        v = normalize.view(out, fold=False)
        matches = [m for p in self._patterns for m in self._match_type.match(p, v.text)]
        if not matches:
            return out, valid, score
        if self._redact:
            return v.rewrite((m.span() for m in matches), lambda _: REDACTED), False, 1.0
        return prompt, False, 1.0
