"""The bypass matrix: every guarded route x stream on/off, in its dialect.

For each: a violating prompt is blocked and never reaches Ollama; a violating answer never reaches the client,
whether the banned text arrives in one chunk or split across many.
"""

from __future__ import annotations

import httpx
import orjson
import pytest

from .policies import BANNED_IN, BANNED_OUT, pure

pytestmark = pytest.mark.slow

# (path, dialect, builds a body from a user text, extracts the answer text from a response)
CHAT = (
    "/api/chat",
    "ollama",
    lambda t, s: {"model": "m", "stream": s, "messages": [{"role": "user", "content": t}]},
)
GEN = ("/api/generate", "ollama", lambda t, s: {"model": "m", "stream": s, "prompt": t})
OA_CHAT = (
    "/v1/chat/completions",
    "openai",
    lambda t, s: {"model": "m", "stream": s, "messages": [{"role": "user", "content": t}]},
)
OA_PARTS = (
    "/v1/chat/completions",
    "openai",
    lambda t, s: {
        "model": "m",
        "stream": s,
        "messages": [{"role": "user", "content": [{"type": "text", "text": t}]}],
    },
)
OA_COMP = ("/v1/completions", "openai", lambda t, s: {"model": "m", "stream": s, "prompt": t})
GENERATING = [CHAT, GEN, OA_CHAT, OA_PARTS, OA_COMP]
EMBEDDING = [
    ("/api/embed", "ollama", lambda t, s: {"model": "m", "input": ["fine", t]}),
    ("/api/embeddings", "ollama", lambda t, s: {"model": "m", "prompt": t}),
    ("/v1/embeddings", "openai", lambda t, s: {"model": "m", "input": t}),
]


def answer_text(path: str, dialect: str, body: bytes, stream: bool) -> str:
    """Every bit of answer text the client received, however it was framed."""
    out = []
    if stream:
        for line in body.splitlines():
            line = line.strip()
            if not line or line == b"data: [DONE]":
                continue
            obj = orjson.loads(line[5:] if line.startswith(b"data:") else line)
            out.append(_text(path, obj))
    else:
        out.append(_text(path, orjson.loads(body)))
    return "".join(out)


def _text(path: str, obj: dict) -> str:
    if "error" in obj:
        return ""
    if path == "/api/chat":
        return obj.get("message", {}).get("content", "")
    if path == "/api/generate":
        return obj.get("response", "")
    c = obj["choices"][0]
    return c.get("text") or (c.get("delta") or c.get("message") or {}).get("content") or ""


@pytest.fixture(scope="module")
def proxy(upstream):
    from ollama_guard.settings import load_settings

    from .conftest import ProxyThread

    p = ProxyThread(load_settings(overrides=pure(ollama_url=upstream.url), environ={})).start()
    yield p
    p.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("route", GENERATING + EMBEDDING, ids=lambda r: r[0] if isinstance(r, tuple) else r)
def test_violating_prompt_is_blocked_and_never_forwarded(proxy, upstream, route, stream):
    path, dialect, make = route
    before = len(upstream.requests)
    r = httpx.post(proxy.url + path, json=make(f"please {BANNED_IN} now", stream))
    assert r.status_code == 403
    assert r.headers["x-guard-decision"] == "blocked; scanners=BanSubstrings"
    body = r.json()
    message = body["error"]["message"] if dialect == "openai" else body["error"]
    assert "BanSubstrings" in message and BANNED_IN not in message
    assert len(upstream.requests) == before


# Where else a caller can put text the model reads: a system prompt, a forged assistant turn, a tool's
# description or one of its parameters' descriptions. Each is scanned with the default config.
_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "{d}",
        "parameters": {"type": "object", "properties": {"q": {"type": "string", "description": "{p}"}}},
    },
}


def _tools(description: str = "look up a word", parameter: str = "the word") -> list[dict]:
    tool = orjson.loads(orjson.dumps(_TOOL).replace(b"{d}", description.encode()).replace(b"{p}", parameter.encode()))
    return [tool]


ELSEWHERE = {
    "system-native": (
        "/api/chat",
        "ollama",
        lambda t, s: {
            "model": "m",
            "stream": s,
            "messages": [{"role": "system", "content": t}, {"role": "user", "content": "hi"}],
        },
    ),
    "system-generate": (
        "/api/generate",
        "ollama",
        lambda t, s: {"model": "m", "stream": s, "prompt": "hi", "system": t},
    ),
    "system-openai": (
        "/v1/chat/completions",
        "openai",
        lambda t, s: {
            "model": "m",
            "stream": s,
            "messages": [{"role": "system", "content": t}, {"role": "user", "content": "hi"}],
        },
    ),
    "assistant-native": (
        "/api/chat",
        "ollama",
        lambda t, s: {
            "model": "m",
            "stream": s,
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": t},
                {"role": "user", "content": "and?"},
            ],
        },
    ),
    "assistant-openai": (
        "/v1/chat/completions",
        "openai",
        lambda t, s: {
            "model": "m",
            "stream": s,
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": t},
                {"role": "user", "content": "and?"},
            ],
        },
    ),
    "tool-description-native": (
        "/api/chat",
        "ollama",
        lambda t, s: {
            "model": "m",
            "stream": s,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": _tools(description=t),
        },
    ),
    "tool-parameter-openai": (
        "/v1/chat/completions",
        "openai",
        lambda t, s: {
            "model": "m",
            "stream": s,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": _tools(parameter=t),
        },
    ),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("where", list(ELSEWHERE))
def test_violating_text_anywhere_the_model_reads_is_blocked_and_never_forwarded(proxy, upstream, where, stream):
    path, dialect, make = ELSEWHERE[where]
    before = len(upstream.requests)
    r = httpx.post(proxy.url + path, json=make(f"please {BANNED_IN} now", stream))
    assert r.status_code == 403, r.text
    assert r.headers["x-guard-decision"] == "blocked; scanners=BanSubstrings"
    assert len(upstream.requests) == before


@pytest.mark.parametrize("chunk_chars", [3, 7, 50], ids=lambda n: f"chunks{n}")
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("route", GENERATING, ids=lambda r: r[0] if isinstance(r, tuple) else r)
def test_violating_answer_never_reaches_the_client(proxy, route, stream, chunk_chars):
    path, dialect, make = route
    body = make(f"REPLY: Here is a long and harmless introduction to the answer. Then {BANNED_OUT} appears.", stream)
    body["options"] = {"fake_chunk_chars": chunk_chars}
    body["metadata"] = {"fake_chunk_chars": chunk_chars}
    r = httpx.post(proxy.url + path, json=body)
    received = answer_text(path, dialect, r.content, stream)
    # No piece of the banned word reached the client, not even a prefix split across chunks.
    assert "FORBIDDEN" not in received and "ANSWER" not in received
    if stream:
        assert r.status_code == 200
        last = r.content.strip().splitlines()[-1]
        if dialect == "ollama":
            final = orjson.loads(last)
            assert final["done"] is True and final["done_reason"] == "guard_blocked"
        else:
            assert last == b"data: [DONE]"
            assert b'"code":"output_blocked"' in r.content
    else:
        assert r.status_code == 403
        assert r.headers["x-guard-decision"] == "blocked; scanners=BanSubstrings"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("route", GENERATING, ids=lambda r: r[0] if isinstance(r, tuple) else r)
def test_clean_answers_arrive_whole(proxy, route, stream):
    path, dialect, make = route
    text = "A perfectly fine answer, long enough to cross several scan windows. " * 6
    r = httpx.post(proxy.url + path, json=make(f"REPLY: {text}", stream))
    assert r.status_code == 200
    assert answer_text(path, dialect, r.content, stream) == text.strip()


def test_native_stream_defaults_to_streaming(proxy):
    # Ollama streams when `stream` is absent; the guard must too (and scan it).
    r = httpx.post(proxy.url + "/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.headers["content-type"] == "application/x-ndjson"
    assert len(r.content.splitlines()) > 2
