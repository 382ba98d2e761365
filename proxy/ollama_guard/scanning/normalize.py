"""A normalised view of a text for pattern matching, with a map back to the original's offsets.

What a model reads as `quokkafire` can be written many ways a plain substring or regex match misses:
fullwidth forms (`ｑｕｏｋｋａｆｉｒｅ`), mixed case, zero-width joiners or soft hyphens inside the word
(`quo\u200dkka`), combining marks (`q\u0301uokka`), or look-alike letters from other scripts (Cyrillic `а` for
Latin `a`). The view undoes each, character by character:

1. NFKD (Unicode compatibility decomposition, UAX #15): fullwidth, ligatures, super/subscripts, circled
   and mathematical letters become their plain forms; accented letters split into base + combining mark.
2. Format characters (general category Cf: zero-width space/joiners, soft hyphen, bidi controls, tag
   characters ...) and nonspacing marks (Mn: accents, variation selectors) are dropped.
3. Letters of the Cyrillic, Greek and Latin scripts that Unicode lists as confusable with a single ASCII
   letter or digit (confusables.txt of UTS #39, as shipped by the `confusable-homoglyphs` package) become
   that character: `а` (U+0430) -> `a`, `ο` (U+03BF) -> `o`, `ɡ` (U+0261) -> `g`.
4. With `fold=True`, case folding (str.casefold: `ß` -> `ss`).

Every original character becomes zero or more view characters, so a match in the view maps back to the
original characters it came from (`View.span`), and a redaction rewrites exactly those. ASCII text, the
common case, costs one `str.isascii` (and a `lower` when folding).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

_SCRIPTS = ("CYRILLIC", "GREEK", "LATIN")


@cache
def confusables() -> dict[str, str]:
    """Non-ASCII Cyrillic/Greek/Latin letter -> the ASCII letter or digit it is confusable with (UTS #39)."""
    import confusable_homoglyphs
    from confusable_homoglyphs import categories

    data = json.loads((Path(confusable_homoglyphs.__file__).parent / "confusables.json").read_text("utf-8"))
    table: dict[str, str] = {}
    for source, glyphs in data.items():
        if len(source) != 1 or source.isascii() or not source.isalpha():
            continue
        if categories.alias(source) not in _SCRIPTS:
            continue
        for glyph in glyphs:
            c = glyph["c"]
            if len(c) == 1 and c.isascii() and c.isalnum():
                table[source] = c
                break
    return table


def dropped(c: str) -> bool:
    """A character the view removes: a format character (Cf) or a nonspacing mark (Mn)."""
    return unicodedata.category(c) in ("Cf", "Mn")


class _Table(dict[int, str]):
    """str.translate table, filled on first sight of each character: code point -> its view (maybe '')."""

    def __init__(self, fold: bool) -> None:
        super().__init__()
        self.fold = fold

    def __missing__(self, cp: int) -> str:
        out = []
        for c in unicodedata.normalize("NFKD", chr(cp)):
            if dropped(c):
                continue
            out.append(confusables().get(c, c))
        piece = "".join(out)
        if self.fold:
            # Fold, then map again: casefold can produce characters with their own look-alikes.
            piece = "".join(confusables().get(c, c) for c in piece.casefold())
        self[cp] = piece
        return piece


_TABLES = {True: _Table(True), False: _Table(False)}


@dataclass(frozen=True, slots=True)
class View:
    original: str
    text: str
    fold: bool

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The original characters view[start:end] came from, as (start, end) offsets into `original`: from
        the character that gave view[start] to the one that gave view[end - 1], dropped characters between
        them included (a joiner inside a matched word goes with it)."""
        if self.original.isascii():
            return start, end
        starts = _starts(self.original, self.fold)
        o_start = starts[start] if start < len(starts) else len(self.original)
        if end <= start:
            return o_start, o_start
        return o_start, starts[end - 1] + 1

    def rewrite(self, spans: Iterable[tuple[int, int]], replace: Callable[[str], str]) -> str:
        """`original` with the original characters behind the view spans (overlapping ones merged) each
        replaced by `replace(those characters)`: how a match found in the view is redacted."""
        merged: list[list[int]] = []
        for start, end in sorted(self.span(s, e) for s, e in spans):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        out, last = [], 0
        for start, end in merged:
            out.append(self.original[last:start])
            out.append(replace(self.original[start:end]))
            last = end
        out.append(self.original[last:])
        return "".join(out)


@lru_cache(maxsize=16)
def _starts(original: str, fold: bool) -> tuple[int, ...]:
    """For each view character, the index of the original character it came from."""
    table = _TABLES[fold]
    starts: list[int] = []
    for i, c in enumerate(original):
        starts.extend([i] * len(table[ord(c)]))
    return tuple(starts)


def view(text: str, *, fold: bool) -> View:
    """The normalised view of `text` (module docstring); `fold` also case-folds it."""
    if text.isascii():
        return View(text, text.lower() if fold else text, fold)
    return View(text, text.translate(_TABLES[fold]), fold)


def back(text: str, pos: int, n: int) -> int:
    """The index i <= pos such that text[i:pos] holds `n` characters the view keeps (or 0): how far back a
    window must reach to cover `n` view characters however many dropped characters are mixed in."""
    start = max(0, pos - n)
    if text[start:pos].isascii():
        return start
    i, need = pos, n
    while i > 0 and need > 0:
        i -= 1
        if not dropped(text[i]):
            need -= 1
    return i
