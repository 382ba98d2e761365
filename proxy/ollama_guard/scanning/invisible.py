"""InvisibleText that catches hidden text and lets real writing through.

llm-guard's InvisibleText refuses every character of the Unicode categories Cf, Co and Cn. That turns away
ordinary text: the zero-width joiner (U+200D) inside every emoji ZWJ sequence, the zero-width non-joiner
(U+200C) Persian, Hindi and other scripts need inside words, the marks RTL writing uses (U+200E/U+200F,
U+061C), Thai's zero-width space between words, and the tag characters of subdivision flags. This scanner
keeps what InvisibleText is for and refuses only what hides text:

- Unicode tag characters (U+E0000-U+E007F), except a well-formed emoji tag sequence after U+1F3F4 (the
  flags of England, Scotland, Wales; Unicode TS #51, "emoji_tag_sequence");
- explicit bidirectional embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069): "Trojan
  Source" (CVE-2021-42574) reorders what a reader sees;
- runs of two or more zero-width characters (U+200B, U+200C, U+200D, U+2060, U+180E, U+FEFF): hidden data is
  spelled in such runs, where one joiner between two visible characters is how scripts and emoji are
  written; a lone U+200B/U+2060/U+FEFF outside words (a byte-order mark at the start is allowed);
- private-use characters (Co), used to smuggle text a font does not draw;
- every other format character (Cf) but the soft hyphen and the script-specific ones listed below;
- unassigned code points (Cn) outside the emoji blocks (newer emoji are unassigned to this Python's
  Unicode tables, and must not be refused).

The scan result is llm-guard's: (text with the refused characters removed, valid, score 1.0 when any).
"""

from __future__ import annotations

import unicodedata
from typing import Any

ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\u180e\ufeff")
JOINERS = frozenset("\u200c\u200d")
# Format characters ordinary writing uses: soft hyphen, Arabic letter mark, LRM/RLM, Arabic number signs and
# end-of-ayah, Syriac abbreviation mark, Arabic pound/piastre marks, Kaithi number signs.
ALLOWED_FORMAT = frozenset(
    "\u00ad\u061c\u200e\u200f\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f\u0890\u0891\u08e2\U000110bd\U000110cd"
)
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
BLACK_FLAG = "\U0001f3f4"
TAG_END = "\U000e007f"
EMOJI_BLOCKS = ((0x1F000, 0x1FAFF), (0x2600, 0x27BF))


def _is_tag(ch: str) -> bool:
    return 0xE0000 <= ord(ch) <= 0xE007F


def _visible(ch: str | None) -> bool:
    return ch is not None and unicodedata.category(ch)[0] in "LMNPS"


def _in_emoji_block(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in EMOJI_BLOCKS)


def hidden_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) spans of `text` that hide text, by the rules in the module docstring."""
    spans: list[tuple[int, int]] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ord(ch) < 0x80:
            i += 1
            continue
        if _is_tag(ch):
            j = i
            while j < n and _is_tag(text[j]):
                j += 1
            body = text[i : j - 1]
            well_formed = (
                i > 0
                and text[i - 1] == BLACK_FLAG
                and text[j - 1] == TAG_END
                and 2 <= len(body) <= 7
                and all(0xE0030 <= ord(c) <= 0xE0039 or 0xE0061 <= ord(c) <= 0xE007A for c in body)
            )
            if not well_formed:
                spans.append((i, j))
            i = j
            continue
        if ch in ZERO_WIDTH:
            j = i
            while j < n and text[j] in ZERO_WIDTH:
                j += 1
            lone_between = j - i == 1 and _visible(text[i - 1] if i else None) and _visible(text[j] if j < n else None)
            leading_bom = i == 0 and j == 1 and ch == "\ufeff"
            if not (lone_between and (ch in JOINERS or ch == "\u200b")) and not leading_bom:
                spans.append((i, j))
            i = j
            continue
        category = unicodedata.category(ch)
        if ch in BIDI_CONTROLS or category == "Co":
            spans.append((i, i + 1))
        elif category == "Cf" and ch not in ALLOWED_FORMAT:
            spans.append((i, i + 1))
        elif category == "Cn" and not _in_emoji_block(ch):
            spans.append((i, i + 1))
        i += 1
    return spans


class InvisibleText:
    """Same interface as llm-guard's InvisibleText: scan(text) -> (sanitized, valid, score)."""

    def __init__(self, **_: Any) -> None:
        pass

    def scan(self, prompt: str) -> tuple[str, bool, float]:
        if prompt.isascii():
            return prompt, True, -1.0
        spans = hidden_spans(prompt)
        if not spans:
            return prompt, True, 0.0
        out, last = [], 0
        for start, end in spans:
            out.append(prompt[last:start])
            last = end
        out.append(prompt[last:])
        return "".join(out), False, 1.0
