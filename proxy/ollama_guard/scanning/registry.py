"""llm-guard scanner types by name, and a loader that imports only the scanners a policy uses.

``import llm_guard`` imports every scanner, and with them torch, transformers, presidio and spaCy: ~520 MB
and 8 s before the first request. A policy of pattern scanners needs none of that, so each scanner module is
imported on its own, under package stubs that skip llm-guard's eager ``__init__`` files. Model scanners
import torch and transformers themselves when a policy actually uses one.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

_IN = "llm_guard.input_scanners"
_OUT = "llm_guard.output_scanners"


@dataclass(frozen=True)
class ScannerType:
    module: str
    cls: str
    # (module, attribute) of llm-guard's default Model for this scanner; None for pure scanners.
    default_model: tuple[str, str] | None = None
    stream: str = "sentence"  # default way to see a streamed answer
    overlap: int | None = None  # pattern scanners: longest match they can make, when known
    # Pattern scanners whose every rewrite and block falls on the word a match ends with (Secrets redacts the
    # value, never its keyword): characters before the running word that must be held back, not only scanned.
    # None: the whole overlap is held.
    hold: int | None = None
    prompt_dependent: bool = False  # output scanners whose verdict depends on the prompt too
    vault: bool = False  # needs the per-request Anonymize vault
    # Output scanners that judge the answer as an answer (its form, or how it relates to the prompt): they
    # do not run on a model's thinking or on tool-call arguments, which every other output scanner sees.
    answer_only: bool = False
    # Asks a model served elsewhere (scanning/guard_models.py): no weights on disk, an async `ask`.
    remote: bool = False


def _model(mod: str, attr: str = "DEFAULT_MODEL") -> tuple[str, str]:
    return (mod, attr)


INPUT_TYPES: dict[str, ScannerType] = {
    "Anonymize": ScannerType(f"{_IN}.anonymize", "Anonymize", stream="sentence", vault=True),
    "BanCode": ScannerType(f"{_IN}.ban_code", "BanCode", _model(f"{_IN}.ban_code", "MODEL_SM")),
    "BanCompetitors": ScannerType(
        f"{_IN}.ban_competitors", "BanCompetitors", _model(f"{_IN}.ban_competitors", "MODEL_V1")
    ),
    # Ours: llm-guard's, also matching the normalised text (fullwidth, look-alikes, hidden joiners).
    "BanSubstrings": ScannerType("ollama_guard.scanning.patterns", "BanSubstrings", stream="pattern"),
    "BanTopics": ScannerType(f"{_IN}.ban_topics", "BanTopics", _model(f"{_IN}.ban_topics", "MODEL_DEBERTA_BASE_V2")),
    "Code": ScannerType(f"{_IN}.code", "Code", _model(f"{_IN}.code")),
    "Gibberish": ScannerType(f"{_IN}.gibberish", "Gibberish", _model(f"{_IN}.gibberish")),
    # Our own: llm-guard's refuses every Cf/Co/Cn character, emoji joiners and Persian/Hindi ZWNJ included.
    "InvisibleText": ScannerType("ollama_guard.scanning.invisible", "InvisibleText", stream="pattern", overlap=8),
    "Language": ScannerType(f"{_IN}.language", "Language", _model(f"{_IN}.language")),
    "PromptInjection": ScannerType(
        f"{_IN}.prompt_injection", "PromptInjection", _model(f"{_IN}.prompt_injection", "V2_MODEL")
    ),
    "Regex": ScannerType("ollama_guard.scanning.patterns", "Regex", stream="pattern"),
    "OllamaGuard": ScannerType("ollama_guard.scanning.guard_models", "OllamaGuard", remote=True),
    # Our subclass: llm-guard's own redaction leaves secrets behind when a text holds several.
    "Secrets": ScannerType("ollama_guard.scanning.secrets", "Secrets", stream="pattern", hold=0),
    "Sentiment": ScannerType(f"{_IN}.sentiment", "Sentiment", stream="final"),
    # Ours: llm-guard's, not tokenizing a text with fewer bytes than the limit (it cannot reach it).
    "TokenLimit": ScannerType("ollama_guard.scanning.token_limit", "TokenLimit", stream="final"),
    "Toxicity": ScannerType(f"{_IN}.toxicity", "Toxicity", _model(f"{_IN}.toxicity")),
}

OUTPUT_TYPES: dict[str, ScannerType] = {
    "BanCode": ScannerType(f"{_OUT}.ban_code", "BanCode", _model(f"{_IN}.ban_code", "MODEL_SM")),
    "BanCompetitors": ScannerType(
        f"{_OUT}.ban_competitors", "BanCompetitors", _model(f"{_IN}.ban_competitors", "MODEL_V1")
    ),
    "BanTopics": ScannerType(f"{_OUT}.ban_topics", "BanTopics", _model(f"{_IN}.ban_topics", "MODEL_DEBERTA_BASE_V2")),
    "Bias": ScannerType(f"{_OUT}.bias", "Bias", _model(f"{_OUT}.bias")),
    "Code": ScannerType(f"{_OUT}.code", "Code", _model(f"{_IN}.code")),
    "Deanonymize": ScannerType(f"{_OUT}.deanonymize", "Deanonymize", stream="pattern", vault=True),
    "FactualConsistency": ScannerType(
        f"{_OUT}.factual_consistency",
        "FactualConsistency",
        _model(f"{_IN}.ban_topics", "MODEL_DEBERTA_BASE_V2"),
        stream="final",
        prompt_dependent=True,
        answer_only=True,
    ),
    "Gibberish": ScannerType(f"{_OUT}.gibberish", "Gibberish", _model(f"{_IN}.gibberish")),
    "JSON": ScannerType(f"{_OUT}.json", "JSON", stream="final", answer_only=True),
    "Language": ScannerType(f"{_OUT}.language", "Language", _model(f"{_IN}.language")),
    "LanguageSame": ScannerType(
        f"{_OUT}.language_same",
        "LanguageSame",
        _model(f"{_IN}.language"),
        stream="final",
        prompt_dependent=True,
        answer_only=True,
    ),
    "MaliciousURLs": ScannerType(f"{_OUT}.malicious_urls", "MaliciousURLs", _model(f"{_OUT}.malicious_urls")),
    "NoRefusal": ScannerType(f"{_OUT}.no_refusal", "NoRefusal", _model(f"{_OUT}.no_refusal"), answer_only=True),
    "NoRefusalLight": ScannerType(f"{_OUT}.no_refusal", "NoRefusalLight", stream="pattern", answer_only=True),
    "ReadingTime": ScannerType(f"{_OUT}.reading_time", "ReadingTime", stream="final", answer_only=True),
    "OllamaGuard": ScannerType("ollama_guard.scanning.guard_models", "OllamaGuard", remote=True),
    "Relevance": ScannerType(
        f"{_OUT}.relevance",
        "Relevance",
        _model(f"{_OUT}.relevance", "MODEL_EN_BGE_BASE"),
        stream="final",
        prompt_dependent=True,
        answer_only=True,
    ),
    "Sentiment": ScannerType(f"{_OUT}.sentiment", "Sentiment", stream="final"),
    "Toxicity": ScannerType(f"{_OUT}.toxicity", "Toxicity", _model(f"{_IN}.toxicity")),
}

# Input scanner types that also make sense on answers (a leaked secret, hidden characters, a banned word or
# pattern: ours for BanSubstrings and Regex, which also match the normalised text).
INPUT_TYPES_ON_OUTPUT = {"Secrets", "InvisibleText", "PromptInjection", "BanSubstrings", "Regex"}


def lookup(type_name: str, direction: str) -> tuple[ScannerType, bool]:
    """The scanner type, and whether it is an input scanner adapted to scan answers."""
    if direction == "input":
        if type_name in INPUT_TYPES:
            return INPUT_TYPES[type_name], False
        known = sorted(INPUT_TYPES)
    else:
        if type_name in OUTPUT_TYPES:
            return OUTPUT_TYPES[type_name], False
        if type_name in INPUT_TYPES_ON_OUTPUT:
            return INPUT_TYPES[type_name], True
        known = sorted(set(OUTPUT_TYPES) | INPUT_TYPES_ON_OUTPUT)
    raise KeyError(f"unknown {direction} scanner type {type_name!r}; known: {', '.join(known)}")


def _install_package_stubs() -> None:
    """Make llm_guard's packages importable without running their eager __init__ modules."""
    if "llm_guard" in sys.modules:
        return
    spec = importlib.util.find_spec("llm_guard")
    if spec is None or spec.origin is None:
        raise ImportError("llm-guard is not installed: pip install 'ollama-guard[proxy]'")
    base = os.path.dirname(spec.origin)
    for name, sub in (("llm_guard", ""), (_IN, "input_scanners"), (_OUT, "output_scanners")):
        module = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None, is_package=True))
        module.__path__ = [os.path.join(base, sub)] if sub else [base]
        module.__file__ = os.path.join(base, sub, "__init__.py")
        sys.modules[name] = module


def import_module(name: str) -> ModuleType:
    # llm-guard's modules, and ours that import them (scanning.secrets, scanning.patterns ...).
    if name.startswith(("llm_guard", "ollama_guard.scanning.")):
        _install_package_stubs()
    return importlib.import_module(name)


def scanner_class(st: ScannerType) -> Any:
    return getattr(import_module(st.module), st.cls)


def default_model(st: ScannerType) -> Any | None:
    if st.default_model is None:
        return None
    mod, attr = st.default_model
    return getattr(import_module(mod), attr)


def new_vault() -> Any:
    """An empty llm-guard Vault (placeholder -> original value), one per request."""
    return import_module("llm_guard.vault").Vault()


def llm_guard_version() -> str:
    from importlib.metadata import version

    return version("llm-guard")
