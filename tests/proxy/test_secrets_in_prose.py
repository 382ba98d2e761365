"""Credentials written the way people paste them (prose, code, JSON, Markdown tables) are redacted wherever
they stand; commit hashes, UUIDs, digests and base64 images are not. The corpus is generated in each
issuer's documented shape (ollama_guard/testing/secret_corpus.py); bench/secrets_corpus.py prints the
detected/total per kind for llm-guard's scanner and ours."""

from __future__ import annotations

import random

import httpx
import pytest
from ollama_guard.scanning import registry
from ollama_guard.testing.secret_corpus import GENERATORS, benign_samples, secret_samples

registry._install_package_stubs()
from ollama_guard.scanning.secrets import PEM_REDACTED, Secrets  # noqa: E402

SAMPLES = secret_samples(seed=3, per_kind=3)
BENIGN = benign_samples(seed=5, per_kind=3)


@pytest.fixture(scope="module")
def scanner():
    return Secrets(redact_mode="all")


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_each_kind_is_redacted_in_prose_code_json_and_markdown(scanner, kind):
    for sample in (s for s in SAMPLES if s.kind == kind):
        out, valid, score = scanner.scan(sample.text)
        assert not valid and score == 1.0, (sample.context, sample.text)
        assert not any(v in out for v in sample.values), (sample.context, out)


def test_the_openai_key_from_the_report_is_redacted_in_a_sentence(scanner):
    key = "sk-7QmW2rTz9KpL4vXn8BcJ" + "hY6dFs3GaQ1wEr5TyUi0OpLk"
    out, valid, _ = scanner.scan(f"My API key is {key}")
    assert not valid and key not in out and out == "My API key is ******"


def test_every_occurrence_of_every_kind_goes_in_one_text(scanner):
    rng = random.Random(9)
    tokens = [GENERATORS[k][1](rng)[0] for k in ("openai-project", "anthropic", "npm", "google-api")]
    text = " and ".join(tokens) + ". Again: " + ", ".join(reversed(tokens)) + "."
    out, valid, _ = scanner.scan(text)
    assert not valid and not any(t in out for t in tokens)
    assert scanner.scan(out)[1], "the redacted text scans clean"


@pytest.mark.parametrize("kind", sorted({s.kind for s in BENIGN}))
def test_hashes_uuids_digests_and_images_are_left_alone(scanner, kind):
    for sample in (s for s in BENIGN if s.kind == kind):
        assert scanner.scan(sample.text) == (sample.text, True, -1.0), sample.text


def test_a_private_key_loses_its_whole_body_and_keeps_its_markers(scanner):
    sample = next(s for s in SAMPLES if s.kind == "private-key" and s.context == "prose")
    out, valid, _ = scanner.scan(sample.text)
    assert not valid
    assert "-----BEGIN RSA PRIVATE KEY-----" + PEM_REDACTED + "-----END RSA PRIVATE KEY-----" in out
    assert out.endswith("Can someone check why the deploy fails?")


def test_a_truncated_private_key_is_redacted_to_the_end(scanner):
    sample = next(s for s in SAMPLES if s.kind == "private-key" and s.context == "code")
    cut = sample.text[: sample.text.index("-----END")]
    out, valid, _ = scanner.scan(cut)
    assert not valid and not any(v[:10] in out for v in sample.values)


@pytest.mark.parametrize("route", ["/api/chat", "/v1/chat/completions"])
def test_a_key_in_a_sentence_never_reaches_ollama(start_proxy, upstream, route):
    p = start_proxy()
    rng = random.Random(4)
    key = GENERATORS["openai-project"][1](rng)[0]
    before = len(upstream.requests)
    body = {"model": "m", "stream": False, "messages": [{"role": "user", "content": f"My API key is {key}, why 401?"}]}
    r = httpx.post(p.url + route, json=body, timeout=30)
    assert r.status_code == 200, r.text
    sent = upstream.requests[before]
    assert key not in sent["raw"].decode() and "My API key is ******, why 401?" in sent["raw"].decode()
