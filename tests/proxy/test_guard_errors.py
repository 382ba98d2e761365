"""When a scanner errors: block by default (fail closed), let through only when configured."""

from __future__ import annotations

import httpx
import pytest

from .policies import pure

pytestmark = pytest.mark.slow


def break_scanner(proxy, name):
    """Make a loaded scanner raise, as a crashing model would (error injection, not a stand-in scanner)."""
    for s in proxy.state.policy.input:
        if s.name == name:

            def boom(*a, **k):
                raise RuntimeError("model crashed")

            s.instance.scan = boom
            return
    raise AssertionError(name)


def body(text="hello there"):
    return {"model": "m", "stream": False, "messages": [{"role": "user", "content": text}]}


def test_scanner_error_blocks_by_default(start_proxy, upstream):
    p = start_proxy(**pure())
    break_scanner(p, "InvisibleText")
    before = len(upstream.requests)
    r = httpx.post(p.url + "/api/chat", json=body("fresh text one"))
    assert r.status_code == 503 and r.json()["error"].startswith("a guard failed")
    assert r.headers["x-guard-decision"] == "error; scanners=InvisibleText"
    assert len(upstream.requests) == before


def test_scanner_error_lets_through_when_configured(start_proxy):
    p = start_proxy(**pure(block_on_guard_error=False))
    break_scanner(p, "InvisibleText")
    r = httpx.post(p.url + "/api/chat", json=body("fresh text two"))
    assert r.status_code == 200


def test_a_failing_sanitizer_always_blocks(start_proxy, upstream):
    # A sanitizer that errored cannot be trusted to have removed what it looks for: refused even when
    # block_on_guard_error is off.
    p = start_proxy(**pure(block_on_guard_error=False))
    break_scanner(p, "Secrets")
    before = len(upstream.requests)
    r = httpx.post(p.url + "/api/chat", json=body("fresh text three"))
    assert r.status_code == 503 and r.headers["x-guard-decision"] == "error; scanners=Secrets"
    assert len(upstream.requests) == before


def test_several_secrets_of_different_kinds_are_all_redacted(start_proxy, upstream):
    from .policies import AWS, GITHUB

    p = start_proxy(**pure())
    text = f"aws {AWS} and github {GITHUB} and aws again {AWS}; stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc"
    r = httpx.post(p.url + "/api/generate", json={"model": "m", "stream": False, "prompt": text})
    assert r.status_code == 200
    sent = upstream.requests[-1]["body"]["prompt"]
    for secret in (AWS, GITHUB, "sk_live_4eC39HqLyjWDarjtT1zdp7dc"):
        assert secret not in sent
    assert sent.count("******") == 4


def test_blocked_response_as_assistant_message(start_proxy):
    from .policies import BANNED_IN

    p = start_proxy(**pure(blocked_response="message", blocked_message="Sorry, not allowed."))
    r = httpx.post(p.url + "/api/chat", json=body(BANNED_IN))
    assert r.status_code == 200 and r.json()["message"]["content"] == "Sorry, not allowed."
    r = httpx.post(p.url + "/v1/chat/completions", json=body(BANNED_IN))
    assert r.json()["choices"][0]["message"]["content"] == "Sorry, not allowed."
    assert r.headers["x-guard-decision"] == "blocked; scanners=BanSubstrings"
