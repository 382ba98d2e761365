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

Running ~170 regular expressions over every line still costs ~1.2 µs per character. Almost all of them need
some literal text to match (a keyword, a prefix such as `AKIA`), so each carries the literals one of which
any match must contain (read off the expression's parse tree), and runs only on lines that contain one. The
comparison is made on text folded the way `re.IGNORECASE` folds it, so a case-insensitive expression is
never skipped for a line it would match: 612 µs -> 90 µs on 512 characters of prose.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from re import _casefix  # type: ignore[attr-defined]
from re import _constants as sre  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]

from detect_secrets.core.scan import MAX_LINE_LENGTH, get_filters
from detect_secrets.core.secrets_collection import SecretsCollection
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.plugins.high_entropy_strings import HighEntropyStringsPlugin
from detect_secrets.settings import cache_bust, configure_settings_from_baseline, get_plugins, get_settings
from llm_guard.input_scanners.secrets import Secrets as _LLMGuardSecrets

from . import token_rules

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
# Each screen expression with the literals one of which its every match contains (folded), or None.
_screen: list[tuple[re.Pattern[str], tuple[str, ...] | None]] | None = None  # None: always scan fully
PIECE = min(MAX_LINE_LENGTH // 2, 20_000)
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


def fold(text: str) -> str:
    """Text as re.IGNORECASE compares it, one character at a time: two characters it treats as equal fold to
    the same. (str.lower() differs from re's per-character lowercase only for U+0130, 'İ'.)"""
    return text.replace("\u0130", "i").lower().translate(_FOLD)


def required_literals(pattern: re.Pattern[str]) -> tuple[str, ...] | None:
    """Folded strings one of which every match of `pattern` contains, or None where there are none (or the
    expression cannot be read: then it simply always runs)."""
    try:
        found = _required(sre_parse.parse(pattern.pattern, pattern.flags))
    except Exception:  # noqa: BLE001 - a private parser of another Python: no prefilter, never a miss
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


def _build_screen() -> list[tuple[re.Pattern[str], tuple[str, ...] | None]] | None:
    patterns: list[re.Pattern[str]] = []
    for plugin in get_plugins():
        if isinstance(plugin, HighEntropyStringsPlugin):
            patterns.append(plugin.regex)
        elif isinstance(plugin, RegexBasedDetector):
            patterns.extend(plugin.denylist)
        else:
            return None
    return [(p, required_literals(p)) for p in patterns]


def _lines(text: str) -> list[str]:
    """Lines as detect-secrets reads them from a file (universal newlines), stripped."""
    return [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]


def could_hold_secret(text: str) -> bool:
    if _screen is None:
        return True
    for line in _lines(text):
        if len(line) < 5:  # detect-secrets' MIN_LINE_LENGTH: it skips such lines too
            continue
        folded = fold(line)
        for pattern, needles in _screen:
            if needles is not None and not any(n in folded for n in needles):
                continue
            if pattern.search(line):
                return True
    return False


def _for_detect_secrets(text: str) -> str:
    """Cut over-long lines into overlapping pieces, one per line: detect-secrets skips longer lines whole."""
    out = []
    for line in text.split("\n"):
        if len(line) <= PIECE:
            out.append(line)
            continue
        for start in range(0, len(line), PIECE - PIECE_OVERLAP):
            out.append(line[start : start + PIECE])
    return "\n".join(out)


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
            _screen = _build_screen()
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
    if secret_type == "Hex High Entropy String":
        return len(value) in (40, 64) and set(value) <= _HEX
    if secret_type == "Base64 High Entropy String":
        return value.startswith(_IMAGE_B64)
    return False


def redact_private_keys(text: str) -> str:
    """Every PEM private key's body, up to its END line or the end of the text, as `PEM_REDACTED`."""
    if "PRIVATE KEY" not in text:
        return text
    return PEM_BLOCK.sub(lambda m: m.group(1) + (PEM_REDACTED if m.group(2).strip() not in ("", "******") else m.group(2)), text)


class Secrets(_LLMGuardSecrets):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        # llm-guard's config is one module-level dict: extend a copy.
        config = dict(self._detect_secrets_config)
        config["plugins_used"] = [*config["plugins_used"], *_OUR_PLUGINS]
        self._detect_secrets_config = config
        _use_settings(config)

    def _secret_values(self, text: str) -> list[str]:
        collection = SecretsCollection()
        fd, path = tempfile.mkstemp(prefix="og-secrets-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(_for_detect_secrets(text).encode("utf-8"))
            collection.scan_file(path)
        finally:
            os.remove(path)
        values = {
            str(found.secret_value)
            for name in collection.files
            for found in collection[name]
            if found.secret_value and not is_benign_value(found.type, str(found.secret_value))
        }
        # Longest first, so a value that contains another is replaced whole.
        return sorted(values, key=len, reverse=True)

    def scan(self, prompt: str) -> tuple[str, bool, float]:
        text = redact_private_keys(prompt)
        if not text.strip() or not could_hold_secret(text):
            return (prompt, True, -1.0) if text == prompt else (text, False, 1.0)
        values = self._secret_values(text)
        if not values:
            return (prompt, True, -1.0) if text == prompt else (text, False, 1.0)
        for _ in range(MAX_PASSES):
            for value in values:
                text = text.replace(value, self.redact_value(value, self._redact_mode))
            values = [v for v in self._secret_values(text)]
            if not values:
                return text, False, 1.0
        raise UnredactableSecret("a detected secret survived redaction")
