"""Banned text written so a plain match misses it (fullwidth, case, hidden joiners and soft hyphens,
combining marks, look-alike letters from other scripts) is caught by BanSubstrings, Regex and Secrets, in
prompts, whole answers and streamed answers, and redaction rewrites exactly the characters it came from."""

from __future__ import annotations

import httpx
import pytest
from ollama_guard.scanning import normalize, registry

from .test_bypass_matrix import GENERATING, answer_text

registry._install_package_stubs()
from ollama_guard.scanning.patterns import BanSubstrings, Regex  # noqa: E402
from ollama_guard.scanning.secrets import Secrets  # noqa: E402

WORD = "quokkafire"
EVASIONS = {
    "fullwidth": "ｑｕｏｋｋａｆｉｒｅ",
    "upper": "QUOKKAFIRE",
    "zero-width-joiner": "quo\u200dkka\u200dfire",
    "zero-width-space": "q\u200bu\u200bo\u200bk\u200bk\u200ba\u200bf\u200bi\u200br\u200be",
    "soft-hyphen": "quokka\u00adfire",
    "combining-marks": "q\u0301uo\u0308kkafire",
    "cyrillic-look-alikes": "quоkkаfirе",  # о, а, е are Cyrillic
    "greek-look-alikes": "quοkkafire",  # ο is Greek
    "math-bold": "𝐪𝐮𝐨𝐤𝐤𝐚𝐟𝐢𝐫𝐞",
    "mixed": "Ｑu\u200dоKKа\u00adfire",
}


@pytest.mark.parametrize("name", sorted(EVASIONS))
def test_the_view_reads_each_evasion_as_the_word_and_maps_it_back(name):
    text = f"Then say {EVASIONS[name]} twice."
    v = normalize.view(text, fold=True)
    i = v.text.index(WORD)
    start, end = v.span(i, i + len(WORD))
    assert text[start:end] == EVASIONS[name]


@pytest.mark.parametrize("name", sorted(EVASIONS))
def test_ban_substrings_blocks_and_redacts_each_evasion(name):
    text = f"Then say {EVASIONS[name]}, and stop."
    assert BanSubstrings([WORD]).scan(text) == (text, False, 1.0)
    assert BanSubstrings([WORD], redact=True).scan(text) == ("Then say [REDACTED], and stop.", False, 1.0)
    assert BanSubstrings([WORD], match_type="word").scan(text)[1] is False


def test_ordinary_text_in_other_scripts_passes():
    scanner = BanSubstrings([WORD, "cat"], match_type="word")
    for text in [
        "Кошка спит на диване.",
        "Η γάτα κοιμάται.",
        "Die Straße ist lang.",
        "猫が寝ている。",
        "Café au lait.",
    ]:
        assert scanner.scan(text)[1] is True, text


def test_regex_matches_the_view_and_keeps_case():
    scanner = Regex([r"\bAKIA[0-9A-Z]{16}\b"], redact=True)
    key = "ＡＫＩＡ" + "IOSFODNN7EXAMPLE"
    assert scanner.scan(f"id {key} ok") == ("id [REDACTED] ok", False, 1.0)
    assert scanner.scan("id akiaiosfodnn7example ok")[1] is True  # case-sensitive patterns stay so


def test_secrets_redacts_a_key_written_in_look_alikes():
    key = "sk-proj-" + "Q7mW2rTz9KpL4vXn8BcJhY6dFs3GaQ1wEr5TyUi0OpLk"
    for written in (key.replace("s", "ѕ", 1), "".join(chr(ord(c) + 0xFEE0) if c.isalnum() else c for c in key)):
        out, valid, _ = Secrets(redact_mode="all").scan(f"My key is {written} thanks")
        assert not valid and out == "My key is ****** thanks", written


@pytest.fixture(scope="module")
def proxy(upstream):
    from ollama_guard.settings import load_settings

    from .conftest import ProxyThread

    ban = {"type": "BanSubstrings", "action": "block", "params": {"substrings": [WORD]}}
    settings = load_settings(
        overrides={"ollama_url": upstream.url, "input_scanners": [ban], "output_scanners": []}, environ={}
    )
    p = ProxyThread(settings).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def answer_proxy(upstream):
    from ollama_guard.settings import load_settings

    from .conftest import ProxyThread

    ban = {"type": "BanSubstrings", "action": "block", "params": {"substrings": [WORD]}}
    settings = load_settings(
        overrides={"ollama_url": upstream.url, "input_scanners": [], "output_scanners": [ban]}, environ={}
    )
    p = ProxyThread(settings).start()
    yield p
    p.stop()


@pytest.mark.parametrize("name", ["fullwidth", "zero-width-space", "cyrillic-look-alikes", "mixed"])
@pytest.mark.parametrize("route", GENERATING, ids=lambda r: r[0] if isinstance(r, tuple) else r)
def test_an_evasion_in_a_prompt_is_refused_and_never_forwarded(proxy, upstream, route, name):
    path, _, make = route
    before = len(upstream.requests)
    r = httpx.post(proxy.url + path, json=make(f"Please say {EVASIONS[name]} now", False))
    assert r.status_code == 403, r.text
    assert len(upstream.requests) == before


@pytest.mark.parametrize("chunk_chars", [1, 3, 7])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("name", ["fullwidth", "zero-width-space", "cyrillic-look-alikes", "mixed"])
def test_an_evasion_in_an_answer_never_reaches_the_client(answer_proxy, name, stream, chunk_chars):
    path, dialect, make = GENERATING[0]
    evasion = EVASIONS[name]
    body = make(f"REPLY: A harmless start of the answer, long enough to be released. Then {evasion} follows.", stream)
    body["options"] = {"fake_chunk_chars": chunk_chars}
    r = httpx.post(answer_proxy.url + path, json=body)
    received = answer_text(path, dialect, r.content, stream)
    seen = normalize.view(received, fold=True).text
    # Not the word, and not its first half either (a prefix released before the match completed).
    assert WORD[:5] not in seen, received
    assert r.status_code == (200 if stream else 403)
