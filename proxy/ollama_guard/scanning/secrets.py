"""llm-guard's Secrets scanner with redaction that leaves no secret behind.

llm-guard 0.3.16 computes every replacement against the original offsets and redacts only the first
occurrence of each value, so a prompt holding two secrets comes out with one of them intact. Detection is
theirs (the same detect-secrets plugins and configuration); redaction here replaces every occurrence of every
detected value, then the result is scanned again and, if anything is still found, redacted again. A text
that cannot be cleaned is reported as such, and the engine blocks it.

llm-guard also swaps detect-secrets' process-global settings in and out around every scan
(`transient_settings`): slow (about 1 ms a scan), and racy when scans run on several threads at once, since
one scan's cleanup can restore the previous settings while another is running. The settings are configured
once per process here instead, and scans only read them.

Most texts hold no secret, and detect-secrets spends ~0.6 ms on every line calling each of its ~110 plugins
through its argument-injection layer. A text is first screened with the plugins' own regular expressions, run
directly on each line as detect-secrets splits and strips them: every plugin in use only reports a value one
of those expressions found (the rest is filtering), so a text none of them matches has nothing to report, and
skips the full scan. Lines longer than detect-secrets' `MAX_LINE_LENGTH` (which it skips silently) are cut into
overlapping pieces, so padding a line cannot hide a secret.

Running ~190 regular expressions over every line still costs ~1.2 µs per character. Almost all of them need
some literal text to match (a keyword, a prefix such as `AKIA`), so each carries the literals one of which
any match must contain (read off the expression's parse tree), and runs only on lines that contain one. The
comparison is made on text folded the way `re.IGNORECASE` folds it, so a case-insensitive expression is
never skipped for a line it would match: 612 µs -> 90 µs on 512 characters of prose; the literals are found
in one Aho-Corasick pass over the text (`Screen`), 90 -> 21 µs (ahocorasick-rs: 0.8 µs per 300 characters,
pyahocorasick's 3 µs). The two expressions that need no literal (the high-entropy strings') are nested: a
line the base64 one misses, the hex one misses too (`_narrower`), and is not searched again.

A line some expression matches is then examined by the plugins of those expressions only, through
detect-secrets' own line scan and filters (`scan_lines`): the cost is linear in the text and checks the
request's scan budget (scanning/budget.py) line by line. Our own plugin adds self-identifying tokens written
in prose (scanning/token_rules.py); PEM private keys are redacted whole; and a text is also scanned in its
normalised form (scanning/normalize.py), a secret found only there being redacted in the original.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from re import _casefix  # type: ignore[attr-defined]
from re import _constants as sre  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

import ahocorasick_rs
from detect_secrets.core.scan import MAX_LINE_LENGTH, MIN_LINE_LENGTH, _is_filtered_out, _scan_line, get_filters
from detect_secrets.core.secrets_collection import SecretsCollection
from detect_secrets.plugins.base import BasePlugin, RegexBasedDetector
from detect_secrets.plugins.high_entropy_strings import HighEntropyStringsPlugin
from detect_secrets.settings import cache_bust, configure_settings_from_baseline, get_plugins, get_settings
from detect_secrets.util.code_snippet import get_code_snippet
from llm_guard.input_scanners.secrets import Secrets as _LLMGuardSecrets

from . import budget, normalize, token_rules

MAX_PASSES = 4


class UnredactableSecret(Exception):
    """A secret was still detected after redaction."""


# detect-secrets' false-positive filters that, in a guard, are bypasses: each makes a real secret pass
# unredacted when the text around it has a certain shape ("token = ghp_...(x)", "<ghp_...>", "$ghp_...",
# "id: AKIA...", or a "pragma: allowlist secret" comment anywhere on the line). Measured on 0.3.16.
BYPASS_FILTERS = (
    "detect_secrets.filters.heuristic.is_indirect_reference",
    "detect_secrets.filters.allowlist.is_line_allowlisted",
    "detect_secrets.filters.heuristic.is_templated_secret",
    "detect_secrets.filters.heuristic.is_prefixed_with_dollar_sign",
    "detect_secrets.filters.heuristic.is_likely_id_string",
)

_settings_lock = threading.Lock()
_settings_key: str | None = None
_screen: Screen | None = None  # None: every line gets every plugin
PIECE = min(MAX_LINE_LENGTH // 2, 20_000)
FILENAME = "<text>"  # the name findings carry; no file is read
# A long scan gives up the GIL every this many examined lines (~1-2 ms of work), so the event loop and other
# requests' scans are not left waiting for the interpreter's 5 ms switch interval at each hand-off.
YIELD_EVERY = 32
PIECE_OVERLAP = 2_000


def _fold_table() -> dict[int, str]:
    """re's case-insensitive equivalences beyond lower() (ı~i, ſ~s, µ~μ ...): each class to one member."""
    parent: dict[str, str] = {}

    def root(c: str) -> str:
        while parent.get(c, c) != c:
            c = parent[c]
        return c

    for k, others in _casefix._EXTRA_CASES.items():
        for o in others:
            a, b = root(chr(k)), root(chr(o))
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {ord(c): root(c) for c in parent}


_FOLD = _fold_table()
# Each class folds to its lowest code point, so no ASCII character is folded to another one (true of every
# Python's tables so far): an ASCII text is then folded by lower() alone (translate() on 300 characters costs
# ~1.5 us, more than the rest of the fold).
_ASCII_UNFOLDED = min(_FOLD, default=128) >= 128


def fold(text: str) -> str:
    """Text as re.IGNORECASE compares it, one character at a time: two characters it treats as equal fold to
    the same. (str.lower() differs from re's per-character lowercase only for U+0130, 'İ'.)"""
    if _ASCII_UNFOLDED and text.isascii():
        return text.lower()
    return text.replace("\u0130", "i").lower().translate(_FOLD)


def required_literals(pattern: re.Pattern[str]) -> tuple[str, ...] | None:
    """Folded strings one of which every match of `pattern` contains, or None where there are none (or the
    expression cannot be read: then it simply always runs)."""
    return _literals(_parsed(pattern))


def _parsed(pattern: re.Pattern[str]) -> Any:
    """The expression's parse tree, or None where this Python's private parser cannot read it."""
    try:
        return sre_parse.parse(pattern.pattern, pattern.flags)
    except Exception:  # noqa: BLE001 - a private parser of another Python: no prefilter, never a miss
        return None


def _literals(tree: Any) -> tuple[str, ...] | None:
    """`required_literals` of a parse tree (None: unreadable)."""
    if tree is None:
        return None
    try:
        found = _required(tree)
    except Exception:  # noqa: BLE001 - a tree of another Python's parser: no prefilter, never a miss
        return None
    return tuple(sorted({fold(x) for x in found})) if found else None


def _required(items: sre_parse.SubPattern | list) -> set[str] | None:
    """For a sequence of parse items: the best set of literals that every match holds one of (or None).
    Only what a match cannot avoid counts: literal runs, groups, branches whose every side has some,
    repeats of at least one. Lookarounds, classes and back-references count for nothing, which is safe."""
    best: set[str] | None = None
    run = ""

    def consider(candidate: set[str] | None) -> None:
        nonlocal best
        if candidate and (best is None or min(map(len, candidate)) > min(map(len, best))):
            best = candidate

    for op, av in items:
        if op is sre.LITERAL:
            run += chr(av)
            continue
        consider({run} if run else None)
        run = ""
        if op is sre.SUBPATTERN:
            consider(_required(av[3]))
        elif op is sre.BRANCH:
            sides = [_required(side) for side in av[1]]
            if all(sides):
                consider(set().union(*sides))  # type: ignore[arg-type]
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT) and av[0] >= 1:
            consider(_required(av[2]))
        elif op is sre.ATOMIC_GROUP:
            consider(_required(av))
    consider({run} if run else None)
    return best


# A screen entry: an expression, the literals one of which its every match contains (folded) or None, and the
# plugin it belongs to.
Entry = tuple[re.Pattern[str], tuple[str, ...] | None, BasePlugin]


def _chars(items: list) -> frozenset[str] | None:
    """The characters of a character class made only of literals and ranges (a parse item's argument), or None
    for any other class (negated, or with a category such as \\d)."""
    out: set[str] = set()
    for op, av in items:
        if op is sre.LITERAL:
            out.add(chr(av))
        elif op is sre.RANGE and av[1] - av[0] < 0x1000:
            out.update(chr(c) for c in range(av[0], av[1] + 1))
        else:
            return None
    return frozenset(out)


def _narrower(narrow: re.Pattern[str], wide: re.Pattern[str], trees: dict[str, Any] | None = None) -> bool:
    """Whether every line `narrow` matches is also matched by `wide` (see `_items_within`); False when unsure.
    `trees`: parse trees by expression source (`_parsed`), filled in as needed and reused across calls."""
    if narrow.flags != wide.flags or narrow.pattern == wide.pattern:
        return False
    trees = {} if trees is None else trees
    for p in (narrow, wide):
        if p.pattern not in trees:
            trees[p.pattern] = _parsed(p)
    a, b = trees[narrow.pattern], trees[wide.pattern]
    return a is not None and b is not None and _items_within(a, b)


def _items_within(narrow: Any, wide: Any) -> bool:
    """Two parse trees alike but where a character class of `narrow` is within `wide`'s at the same place,
    inside groups, branches, repeats and positive lookarounds only. Every string `narrow` matches, `wide` then
    matches too: a backtracking search finds a match wherever one exists, and the path `narrow`'s match took
    is open to `wide` (each class takes at least the same characters; equal items match alike). Anything
    else that differs, or any nested construct this does not walk (atomic groups, possessive repeats,
    negative lookarounds), makes it answer False."""
    narrow, wide = list(narrow), list(wide)
    if len(narrow) != len(wide):
        return False
    for (op_a, av_a), (op_b, av_b) in zip(narrow, wide, strict=True):
        if op_a is not op_b:
            return False
        if av_a == av_b:
            continue
        if op_a is sre.IN:
            ca, cb = _chars(av_a), _chars(av_b)
            if ca is None or cb is None or not ca <= cb:
                return False
        elif op_a is sre.SUBPATTERN:
            if av_a[:3] != av_b[:3] or not _items_within(av_a[3], av_b[3]):
                return False
        elif op_a is sre.BRANCH:
            if len(av_a[1]) != len(av_b[1]) or not all(
                _items_within(x, y) for x, y in zip(av_a[1], av_b[1], strict=True)
            ):
                return False
        elif op_a in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            if av_a[:2] != av_b[:2] or not _items_within(av_a[2], av_b[2]):
                return False
        elif op_a is sre.ASSERT:
            if av_a[0] != av_b[0] or not _items_within(av_a[1], av_b[1]):
                return False
        else:  # a negative lookaround, an atomic group or possessive repeat, a negated class: not monotone
            return False
    return True


@dataclass(frozen=True)
class Screen:
    """The plugins' expressions, and the index that picks, for a text, those whose literals occur in it."""

    entries: list[Entry]
    automaton: ahocorasick_rs.AhoCorasick | None  # every literal of the entries, found in one pass
    always: list[int]  # entries with no literal: tried on every text
    always_entries: list[Entry]  # those entries (do not modify: returned as they are by entries_for)
    by_literal: dict[str, list[int]]  # literal -> the entries that need it
    by_match: list[list[int]]  # the automaton's pattern index -> the entries that need that literal
    # An expression -> an earlier one that matches every line it matches (`_narrower`): a line the wider one
    # did not match is not searched with the narrower one (Hex- within Base64HighEntropyString's).
    wider: dict[re.Pattern[str], re.Pattern[str]]

    @classmethod
    def build(cls) -> Screen | None:
        """From the plugins in use; None if one of them is not expression-based."""
        entries: list[Entry] = []
        trees: dict[str, Any] = {}
        for plugin in get_plugins():
            if isinstance(plugin, HighEntropyStringsPlugin):
                patterns = [plugin.regex]
            elif isinstance(plugin, RegexBasedDetector):
                patterns = list(plugin.denylist)
            else:
                return None
            for p in patterns:  # each parsed once, for its literals and for `_narrower`
                trees[p.pattern] = _parsed(p)
                entries.append((p, _literals(trees[p.pattern]), plugin))
        by_literal: dict[str, list[int]] = {}
        for i, (_, needed, _) in enumerate(entries):
            for lit in needed or ():
                by_literal.setdefault(lit, []).append(i)
        automaton = None
        literals = list(by_literal)
        if literals:
            automaton = ahocorasick_rs.AhoCorasick(literals, matchkind=ahocorasick_rs.MatchKind.Standard)
        always = [i for i, (_, needed, _) in enumerate(entries) if needed is None]
        wider: dict[re.Pattern[str], re.Pattern[str]] = {}
        for i, (narrow, _, _) in enumerate(entries):
            for wide, _, _ in entries[:i]:
                if _narrower(narrow, wide, trees):
                    wider[narrow] = wide
                    break
        by_match = [by_literal[lit] for lit in literals]
        return cls(entries, automaton, always, [entries[i] for i in always], by_literal, by_match, wider)

    def entries_for(self, text: str, folded: str | None = None) -> list[Entry]:
        """The entries that can match somewhere in `text` (`folded`: fold(text), if the caller has it):
        every literal occurring in it is found in one Aho-Corasick pass (ahocorasick-rs, Rust: ~0.8 us for 300
        characters, pyahocorasick took ~3 us), so a line is then tried against a few expressions, not ~190
        (~190 substring searches per text were the largest cost of a streamed answer's windows)."""
        found: list[tuple[int, int, int]] = []
        if self.automaton is not None:
            found = self.automaton.find_matches_as_indexes(fold(text) if folded is None else folded, overlapping=True)
        if not found:  # most texts: only the expressions that need no literal
            return self.always_entries
        chosen = set(self.always)
        by_match = self.by_match
        for index, _, _ in found:
            chosen.update(by_match[index])
        return [self.entries[i] for i in sorted(chosen)]


def _lines(text: str) -> list[str]:
    """Lines as detect-secrets reads them from a file (universal newlines), with lines longer than
    detect-secrets' `MAX_LINE_LENGTH` (which it skips silently) cut into overlapping pieces."""
    out = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if len(line) <= PIECE:
            out.append(line)
            continue
        for start in range(0, len(line), PIECE - PIECE_OVERLAP):
            out.append(line[start : start + PIECE])
    return out


def _screen_for(text: str, folded: str | None = None) -> list[Entry] | None:
    """The screen entries that can match in `text` (`folded`: fold(text), if the caller has it); None when
    there is no screen (every plugin runs)."""
    return _screen.entries_for(text, folded) if _screen is not None else None


def _plugins_for(line: str, screen: list[Entry] | None, folded: str | None = None) -> list[BasePlugin]:
    """The plugins one of whose expressions matches this (stripped) line: the only ones that can report.
    `folded`: the line already folded, if the caller has it."""
    if screen is None:
        return list(get_plugins())
    if folded is None:
        folded = fold(line) if any(needles for _, needles, _ in screen) else line
    found: list[BasePlugin] = []
    wider = _screen.wider if _screen is not None else {}
    missed: set[re.Pattern[str]] = set()  # expressions searched that did not match
    for pattern, needles, plugin in screen:
        if needles is not None and not any(n in folded for n in needles):
            continue
        if found and any(p is plugin for p in found):
            continue
        if wider and wider.get(pattern) in missed:
            continue
        if pattern.search(line):
            found.append(plugin)
        else:
            missed.add(pattern)
    return found


def could_hold_secret(text: str) -> bool:
    screen = _screen_for(text)
    return any(MIN_LINE_LENGTH <= len(line.strip()) and _plugins_for(line.strip(), screen) for line in _lines(text))


def scan_lines(text: str) -> list[tuple[str, str]]:
    """(secret type, value) for each finding of detect-secrets' plugins and filters in `text`, as its
    `scan_file` reports them, at a cost linear in the text: each line is screened, and only the plugins whose
    expressions match it are run on it (detect-secrets runs all ~110 on every line, and re-reads the whole
    file per line: ~33 ms per KB of short `k=<random>` lines, where a text that matches on every line made
    a 98 KB prompt cost 3.2 s of CPU). Checks the scan budget before each line it examines
    (budget.ScanBudgetExceeded). Uses detect-secrets' line scan and filters (`_scan_line`,
    `_is_filtered_out`): internal names of the pinned bc-detect-secrets 1.5.43, tested against `scan_file`."""
    lines = _lines(text)
    folded = fold(text) if _screen is not None else None  # once, for the screen and a one-line text's line
    screen = _screen_for(text, folded)
    found: list[tuple[str, str]] = []
    examined = 0
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not MIN_LINE_LENGTH <= len(line) <= MAX_LINE_LENGTH:
            continue
        plugins = _plugins_for(line, screen, folded if line == text else None)
        if not plugins:
            continue
        budget.check()
        examined += 1
        if not examined % YIELD_EVERY:
            time.sleep(0)  # let the other threads (the event loop, other requests' scans) have the GIL
        snippet = get_code_snippet(lines=lines, line_number=number)
        if _is_filtered_out(required_filter_parameters=["line"], filename=FILENAME, line=line, context=snippet):
            continue
        for plugin in plugins:
            for secret in _scan_line(
                plugin=plugin,
                filename=FILENAME,
                line=line,
                line_number=number,
                context=snippet,
                raw_context=snippet,
                commit_hash="",
            ):
                if secret.secret_value and not _is_filtered_out(
                    required_filter_parameters=["context"],
                    filename=FILENAME,
                    secret=secret.secret_value,
                    plugin=plugin,
                    line=line,
                    context=snippet,
                ):
                    found.append((secret.type, str(secret.secret_value)))
    return found


def scan_file_reference(text: str) -> list[tuple[str, str]]:
    """The same findings through detect-secrets' own `scan_file` on a temporary file (slow; for tests)."""
    collection = SecretsCollection()
    fd, path = tempfile.mkstemp(prefix="og-secrets-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write("\n".join(_lines(text)).encode("utf-8"))
        collection.scan_file(path)
    finally:
        os.remove(path)
    return [(f.type, str(f.secret_value)) for name in collection.files for f in collection[name] if f.secret_value]


def _use_settings(config: dict) -> None:
    global _settings_key, _screen
    key = json.dumps(config, sort_keys=True)
    if _settings_key == key:
        return
    with _settings_lock:
        if _settings_key != key:
            cache_bust()
            configure_settings_from_baseline(config)
            get_settings().disable_filters(*BYPASS_FILTERS)
            get_filters.cache_clear()
            _screen = Screen.build()
            _settings_key = key


# Our plugin for self-identifying tokens (OpenAI, Anthropic, Google, Hugging Face, npm ... in prose).
_OUR_PLUGINS = [{"name": "PrefixedTokenDetector", "path": f"file://{token_rules.__file__}"}]

# A PEM private key block (RFC 7468): its header, then everything up to its END line or the end of the text
# (a streamed answer's window may hold only part of it; a last line of a dash then dashes and capitals is left
# alone, as it may be the END line still arriving). detect-secrets finds a key only with 10+ body characters right after
# the header, so a key redacted by it line by line in a stream would leak from its second line on. The header
# stays, so each later window sees it and redacts the next body lines too.
PEM_BLOCK = re.compile(
    r"(-*BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-*)(.*?)"
    r"(?=-*END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-*|\n-[-A-Z ]*\Z|\Z)",
    re.DOTALL,
)
PEM_REDACTED = "\n******\n"

# Base64 of the image formats a multimodal chat carries (PNG, JPEG, GIF, WebP): data, not credentials.
_IMAGE_B64 = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR")
_HEX = frozenset("0123456789abcdefABCDEF")


def is_benign_value(secret_type: str, value: str) -> bool:
    """Entropy findings that are known data: a git object name or a sha256 digest (40 or 64 hex digits),
    a base64 image. Named rules (a token's prefix) are never dismissed."""
    if secret_type == "Hex High Entropy String":  # noqa: S105 - a finding type, not a password
        return len(value) in (40, 64) and set(value) <= _HEX
    if secret_type == "Base64 High Entropy String":  # noqa: S105
        return value.startswith(_IMAGE_B64)
    return False


def redact_private_keys(text: str) -> str:
    """Every PEM private key's body, up to its END line or the end of the text, as `PEM_REDACTED`."""
    if "PRIVATE KEY" not in text:
        return text
    return PEM_BLOCK.sub(
        lambda m: m.group(1) + (PEM_REDACTED if m.group(2).strip() not in ("", "******") else m.group(2)), text
    )


class Secrets(_LLMGuardSecrets):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        # llm-guard's config is one module-level dict: extend a copy.
        config: dict[str, Any] = dict(self._detect_secrets_config)  # type: ignore[has-type]
        config["plugins_used"] = [*config["plugins_used"], *_OUR_PLUGINS]
        self._detect_secrets_config = config
        _use_settings(config)

    def _redact_once(self, text: str) -> str:
        for value in self._secret_values(text) if text.strip() else []:
            text = text.replace(value, self.redact_value(value, self._redact_mode))
        if text.isascii():  # the view changes nothing a secret could hide in: not built
            return text
        v = normalize.view(text, fold=False)
        if v.text == text:
            return text
        # Found only once normalised: rewrite the original characters each occurrence came from. Only the
        # lines the view changed can hold such a secret.
        changed = "\n".join(vl for ol, vl in zip(text.split("\n"), v.text.split("\n"), strict=True) if ol != vl)
        spans = [m.span() for value in self._secret_values(changed) for m in re.finditer(re.escape(value), v.text)]
        return v.rewrite(spans, lambda found: self.redact_value(found, self._redact_mode))

    def _secret_values(self, text: str) -> list[str]:
        values = {value for kind, value in scan_lines(text) if not is_benign_value(kind, value)}
        # Longest first, so a value that contains another is replaced whole.
        return sorted(values, key=len, reverse=True)

    def scan(self, prompt: str) -> tuple[str, bool, float]:
        """Redact every secret, as written or once normalised (fullwidth forms, look-alike letters, hidden
        joiners: scanning/normalize.py), then scan again until nothing is found. Raises UnredactableSecret
        when a secret survives MAX_PASSES rounds (the engine blocks the text)."""
        text = redact_private_keys(prompt)
        for _ in range(MAX_PASSES):
            redacted = self._redact_once(text)
            if redacted == text:
                return (prompt, True, -1.0) if text == prompt else (text, False, 1.0)
            text = redacted
        raise UnredactableSecret("a detected secret survived redaction")
