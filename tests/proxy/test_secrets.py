"""The Secrets scanner: every secret redacted, including shapes llm-guard's filters let through."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from ollama_guard.scanning import registry

from .policies import AWS, GITHUB

registry._install_package_stubs()
from ollama_guard.scanning.secrets import Secrets  # noqa: E402


@pytest.fixture(scope="module")
def scanner():
    return Secrets()


@pytest.mark.parametrize(
    "text",
    [
        f"config: token = {GITHUB}(prod)",  # llm-guard: filtered as an "indirect reference"
        f"my key is <{GITHUB}>",  # "templated secret"
        f"key ${AWS}",  # "prefixed with dollar sign"
        f"{AWS} # pragma: allowlist secret",  # "allowlisted line"
        f"id: {AWS}",  # "likely id string"
        f"two kinds: {AWS} and {GITHUB}, then {AWS} again",  # llm-guard leaves one behind
    ],
)
def test_secret_is_redacted_whatever_surrounds_it(scanner, text):
    out, valid, score = scanner.scan(text)
    assert not valid and score == 1.0
    assert AWS not in out and GITHUB not in out and "******" in out


def test_plain_prose_passes_untouched(scanner):
    text = "Paris is the capital of France; the Seine runs through it."
    assert scanner.scan(text) == (text, True, -1.0)


def test_concurrent_scans_all_detect(scanner):
    # llm-guard swaps detect-secrets' global settings around each scan, so concurrent scans could run with
    # none; ours configure once. 200 scans on 8 threads: every one finds its secret.
    texts = [f"request {i}: use {AWS} now" for i in range(200)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(scanner.scan, texts))
    assert all(not valid and AWS not in out for out, valid, _ in results)


SAMPLES = [
    AWS,
    GITHUB,
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    "-----BEGIN RSA PRIVATE KEY-----",
    "https://admin:hunter2secret@internal.corp.local/db",
    'api_secret = "8f14e45fceea167a5a36dedd4bea2543c1b0f5d2"',
    "password: 'Zx9$kLm2#Qw8!pR4vN7@'",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "AccountKey=lJzRc1YdHaAA2KCNJJ1tkYwF/+mKK6Ygw0NGe170Xu592euJv2wYUtBlV8z+qnlcNQSnIYVTkLWntUO1F8j8rQ==",
]
PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris: the capital of France = lovely; 'quoted words' here",
    "key = value, id=42, x:y",
    "def f(x):\n    return x * 2\n",
    "\u2028 unusual\u2029separators\r\nand\rreturns",
]


def test_screen_never_skips_a_text_the_full_scan_would_flag(scanner):
    import random

    from ollama_guard.scanning.secrets import could_hold_secret

    rng = random.Random(7)
    texts = list(SAMPLES) + list(PROSE)
    for _ in range(150):
        parts = [rng.choice(PROSE) for _ in range(rng.randint(0, 3))]
        if rng.random() < 0.6:
            parts.insert(rng.randint(0, len(parts)), rng.choice(SAMPLES))
        texts.append(rng.choice([" ", "\n", "\t", ""]).join(parts))
    flagged = 0
    for text in texts:
        found = scanner._secret_values(text)
        flagged += bool(found)
        assert could_hold_secret(text) or not found, text
    assert flagged > 50  # the corpus really holds secrets the full scan finds


def test_a_secret_at_the_end_of_a_very_long_line_is_found(scanner):
    text = "word " * 30_000 + AWS  # a 150,000-character line: detect-secrets alone skips lines over 100,000
    out, valid, _ = scanner.scan(text)
    assert not valid and AWS not in out
