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
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading

from detect_secrets.core.scan import MAX_LINE_LENGTH, get_filters
from detect_secrets.core.secrets_collection import SecretsCollection
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.plugins.high_entropy_strings import HighEntropyStringsPlugin
from detect_secrets.settings import cache_bust, configure_settings_from_baseline, get_plugins, get_settings
from llm_guard.input_scanners.secrets import Secrets as _LLMGuardSecrets

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
_screen: list[re.Pattern[str]] | None = None  # None: some plugin is not regex-based, always scan fully
PIECE = min(MAX_LINE_LENGTH // 2, 20_000)
PIECE_OVERLAP = 2_000


def _build_screen() -> list[re.Pattern[str]] | None:
    patterns: list[re.Pattern[str]] = []
    for plugin in get_plugins():
        if isinstance(plugin, HighEntropyStringsPlugin):
            patterns.append(plugin.regex)
        elif isinstance(plugin, RegexBasedDetector):
            patterns.extend(plugin.denylist)
        else:
            return None
    return patterns


def _lines(text: str) -> list[str]:
    """Lines as detect-secrets reads them from a file (universal newlines), stripped."""
    return [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]


def could_hold_secret(text: str) -> bool:
    if _screen is None:
        return True
    for line in _lines(text):
        if len(line) < 5:  # detect-secrets' MIN_LINE_LENGTH: it skips such lines too
            continue
        for pattern in _screen:
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


class Secrets(_LLMGuardSecrets):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        _use_settings(self._detect_secrets_config)

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
            if found.secret_value
        }
        # Longest first, so a value that contains another is replaced whole.
        return sorted(values, key=len, reverse=True)

    def scan(self, prompt: str) -> tuple[str, bool, float]:
        if not prompt.strip() or not could_hold_secret(prompt):
            return prompt, True, -1.0
        values = self._secret_values(prompt)
        if not values:
            return prompt, True, -1.0
        text = prompt
        for _ in range(MAX_PASSES):
            for value in values:
                text = text.replace(value, self.redact_value(value, self._redact_mode))
            values = [v for v in self._secret_values(text)]
            if not values:
                return text, False, 1.0
        raise UnredactableSecret("a detected secret survived redaction")
