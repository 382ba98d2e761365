"""llm-guard's Secrets scanner with redaction that leaves no secret behind.

llm-guard 0.3.16 computes every replacement against the original offsets and redacts only the first
occurrence of each value, so a prompt holding two secrets comes out with one of them intact. Detection is
theirs (the same detect-secrets plugins and configuration); redaction here replaces every occurrence of every
detected value, then the result is scanned again and, if anything is still found, redacted again. A text
that cannot be cleaned is reported as such, and the engine blocks it.
"""

from __future__ import annotations

import os
import tempfile

from detect_secrets.core.secrets_collection import SecretsCollection
from detect_secrets.settings import transient_settings
from llm_guard.input_scanners.secrets import Secrets as _LLMGuardSecrets

MAX_PASSES = 4


class UnredactableSecret(Exception):
    """A secret was still detected after redaction."""


class Secrets(_LLMGuardSecrets):
    def _secret_values(self, text: str) -> list[str]:
        collection = SecretsCollection()
        fd, path = tempfile.mkstemp(prefix="og-secrets-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(text.encode("utf-8"))
            with transient_settings(self._detect_secrets_config):
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
        if not prompt.strip():
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
