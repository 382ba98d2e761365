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
