"""Tiny classification models the tests build in well under a second: real weights, real loading code.

A 2-layer BERT with hidden size 32 and a hand-written WordPiece vocab. With the classifier's weights zeroed,
its bias alone decides the label, so a model is deterministically always-INJECTION or always-SAFE (or
always toxic / never toxic), whatever the text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

WORDS = [
    "hello",
    "world",
    "ignore",
    "previous",
    "instructions",
    "the",
    "a",
    "is",
    "what",
    "capital",
    "of",
    "france",
    "paris",
    "please",
    "tell",
    "me",
    "you",
    "are",
    "idiot",
    ".",
    ",",
    "?",
    "!",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOXIC_LABELS = [
    "toxicity",
    "severe_toxicity",
    "obscene",
    "threat",
    "insult",
    "identity_attack",
    "sexual_explicit",
]


def _tiny_bert(path: Path, model_cls: str, labels: list[str], bias: list[float], **config: Any) -> Path:
    """A 2-layer BERT with a real WordPiece tokenizer whose head ignores its input: a zero weight and `bias`,
    so every text (or token) gets the same logits."""
    import torch
    import transformers
    from transformers import BertConfig, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    cfg = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        **config,
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_classifier(path: Path, labels: list[str], bias: list[float], problem_type: str | None = None) -> Path:
    return _tiny_bert(path, "BertForSequenceClassification", labels, bias, problem_type=problem_type)


def injection_model(path: Path, always_injection: bool) -> Path:
    return build_classifier(path, ["SAFE", "INJECTION"], [0.0, 6.0] if always_injection else [6.0, 0.0])


def toxicity_model(path: Path, toxic: bool) -> Path:
    bias = [(6.0 if toxic else -6.0)] + [-6.0] * (len(TOXIC_LABELS) - 1)
    return build_classifier(path, TOXIC_LABELS, bias, "multi_label_classification")


def ner_model(path: Path) -> Path:
    """A token-classification model that tags every token "O": the NER finds nothing by itself, so what
    Anonymize finds comes from presidio's pattern recognizers (e-mail, phone, card numbers ...)."""
    return _tiny_bert(path, "BertForTokenClassification", ["O", "B-FIRSTNAME", "I-FIRSTNAME"], [6.0, 0.0, 0.0])
