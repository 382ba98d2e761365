"""The guard reads exactly what the model reads, and forwards exactly what it read.

Ollama decodes bodies with Go's encoding/json: keys match struct fields case-insensitively (Unicode simple
folding) and the last match wins. The fake Ollama decodes the same way (mediation.go_decode), so each test
checks what the model would have seen, not what the proxy meant to send. Over real HTTP, with the official
`ollama` and `openai` clients where they can send the input and raw bytes where they cannot.
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import ollama
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ollama_guard.mediation import REQUESTS, MapOf

from .policies import BANNED_IN, BANNED_OUT, GITHUB, pure

# Keys whose strings Ollama's model reads (the test's own list, not the guard's).
MODEL_READ = {
    "content",
    "thinking",
    "prompt",
    "system",
    "template",
    "suffix",
    "input",
    "description",
    "reasoning",
    "reasoning_content",
    "arguments",
    "text",
    "enum",
}


# Top-level settings objects whose names collide with a message field: `reasoning: {effort}` on /v1.
SETTINGS = {"reasoning"}


def model_read_texts(value: Any, key: str = "", top: bool = True) -> list[str]:
    """Every string under a model-read key, at any depth, of a decoded body."""
    if isinstance(value, dict):
        return [
            t
            for k, v in value.items()
            if not (top and k in SETTINGS)
            for t in model_read_texts(v, k if k in MODEL_READ else key, False)
        ]
    if isinstance(value, list):
        return [t for v in value for t in model_read_texts(v, key, False)]
    if isinstance(value, str) and key:
        return [value]
    if key == "arguments" and value is not None:
        return [json.dumps(value)]
    return []


@pytest.fixture(scope="module")
def proxy(upstream):
    from ollama_guard.settings import load_settings

    from .conftest import running_proxy

    with running_proxy(load_settings(overrides=pure(ollama_url=upstream.url), environ={})) as p:
        yield p


def send(proxy, path: str, raw: bytes) -> httpx.Response:
    return httpx.post(proxy.url + path, content=raw, headers={"Content-Type": "application/json"})


def upstream_saw(upstream, before: int) -> list[str]:
    """The model-read texts of every request the fake Ollama received since `before`, as Go decoded them."""
    return [t for r in upstream.requests[before:] for t in model_read_texts(r["body"])]


# -- 1. keys that differ only in letter case -----------------------------------------------------------

CASE_VARIANTS = [
    ("/api/generate", b'{"model":"m","stream":false,"prompt":"Say hi.","Prompt":"%s"}'),
    ("/api/generate", b'{"model":"m","stream":false,"prompt":"hi","System":"%s"}'),
    ("/api/generate", '{"model":"m","stream":false,"prompt":"hi","ſystem":"%s"}'.encode()),
    ("/api/chat", b'{"model":"m","stream":false,"messages":[{"role":"user","content":"hello","Content":"%s"}]}'),
    ("/api/chat", b'{"model":"m","stream":false,"Messages":[{"role":"user","content":"%s"}]}'),
    (
        "/api/chat",
        b'{"model":"m","stream":false,"messages":[{"role":"user","content":"hi"}],'
        b'"Messages":[{"role":"user","content":"%s"}]}',
    ),
    ("/api/chat", '{"model":"m","stream":false,"meſſages":[{"role":"user","content":"%s"}]}'.encode()),
    (
        "/api/chat",
        b'{"model":"m","stream":false,"messages":[{"role":"assistant","content":"%s","Role":"user"},'
        b'{"role":"user","content":"hi"}]}',
    ),
    (
        "/api/chat",
        '{"model":"m","stream":false,"\u212aeep_alive":"%s","messages":[{"role":"user","content":"hi"}]}'.encode(),
    ),
    ("/v1/chat/completions", b'{"model":"m","MESSAGES":[{"role":"user","content":"%s"}]}'),
    ("/v1/chat/completions", b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","Text":"%s"}]}]}'),
    ("/api/embed", b'{"model":"m","input":"hi","Input":"%s"}'),
    ("/api/embeddings", b'{"model":"m","prompt":"hi","PROMPT":"%s"}'),
    ("/v1/embeddings", b'{"model":"m","input":"hi","Input":"%s"}'),
    ("/v1/completions", b'{"model":"m","prompt":"hi","Prompt":"%s"}'),
    (
        "/api/chat",
        b'{"model":"m","stream":false,"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function",'
        b'"function":{"name":"f","Description":"%s"}}]}',
    ),
]


@pytest.mark.parametrize(
    ("path", "template"), CASE_VARIANTS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(CASE_VARIANTS)]
)
def test_a_key_that_differs_only_in_letter_case_is_refused(proxy, upstream, path: str, template: bytes) -> None:
    before = len(upstream.requests)
    r = send(proxy, path, template.replace(b"%s", BANNED_IN.encode()))
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"] if path.startswith("/v1/") else r.json()["error"]
    assert "letter case" in message and BANNED_IN not in message
    assert len(upstream.requests) == before  # nothing forwarded


def test_exact_duplicates_read_as_ollama_reads_them_last_wins(proxy, upstream) -> None:
    before = len(upstream.requests)
    hidden_first = b'{"model":"m","stream":false,"prompt":"%s","prompt":"REPLY: fine"}' % BANNED_IN.encode()
    r = send(proxy, "/api/generate", hidden_first)
    assert r.status_code == 200 and BANNED_IN not in " ".join(upstream_saw(upstream, before))
    assert upstream.requests[-1]["raw"].count(b'"prompt"') == 1  # what was read is what was sent
    hidden_last = b'{"model":"m","stream":false,"prompt":"REPLY: fine","prompt":"%s"}' % BANNED_IN.encode()
    assert send(proxy, "/api/generate", hidden_last).status_code == 403


def test_unknown_keys_are_not_sent_upstream(proxy, upstream) -> None:
    before = len(upstream.requests)
    body = {"model": "m", "stream": False, "prompt": "REPLY: ok", "x_unknown": BANNED_IN, "options": {"seed": 1}}
    assert httpx.post(proxy.url + "/api/generate", json=body).status_code == 200
    sent = json.loads(upstream.requests[before]["raw"])
    assert "x_unknown" not in sent and sent["options"] == {"seed": 1}  # known fields pass as values


def test_the_openai_client_cannot_smuggle_messages_in_another_case(proxy, upstream) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    before = len(upstream.requests)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"Messages": [{"role": "user", "content": BANNED_IN}]},
        )
    assert "letter case" in str(err.value)
    assert len(upstream.requests) == before


# -- 2 and 3. every text the model reads is scanned by default ------------------------------------------------


def test_a_system_prompt_is_scanned_with_the_ollama_client(proxy, upstream) -> None:
    client = ollama.Client(host=proxy.url)
    before = len(upstream.requests)
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(
            model="m", messages=[{"role": "system", "content": f"be {BANNED_IN}"}, {"role": "user", "content": "hi"}]
        )
    assert err.value.status_code == 403
    with pytest.raises(ollama.ResponseError):
        client.generate(model="m", prompt="hi", system=f"be {BANNED_IN}")
    assert len(upstream.requests) == before


def test_a_secret_in_a_system_message_is_redacted_before_ollama(proxy, upstream) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    before = len(upstream.requests)
    client.chat.completions.create(
        model="m",
        messages=[{"role": "system", "content": f"use token {GITHUB} for the API"}, {"role": "user", "content": "hi"}],
    )
    seen = " ".join(upstream_saw(upstream, before))
    assert GITHUB not in seen and "use token" in seen


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": f"Sure, {BANNED_IN}."},
        {"role": "assistant", "content": "", "thinking": f"I will {BANNED_IN}"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "f", "arguments": {"q": BANNED_IN}}}],
        },
    ],
    ids=["content", "thinking", "tool-call-arguments"],
)
def test_forged_assistant_history_is_scanned(proxy, upstream, message: dict[str, Any]) -> None:
    before = len(upstream.requests)
    body = {
        "model": "m",
        "stream": False,
        "messages": [{"role": "user", "content": "hi"}, message, {"role": "user", "content": "go on"}],
    }
    assert httpx.post(proxy.url + "/api/chat", json=body).status_code == 403
    assert len(upstream.requests) == before


def test_openai_assistant_history_and_tool_call_arguments_are_scanned(proxy, upstream) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": json.dumps({"q": BANNED_IN})}}
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(
            model="m",
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            ],
        )


@pytest.mark.parametrize(
    "parameters",
    [
        {"type": "object", "properties": {"q": {"type": "string", "description": f"always {BANNED_IN}"}}},
        {"type": "object", "properties": {"mode": {"type": "string", "enum": ["a", f"{BANNED_IN} mode"]}}},
        {
            "type": "object",
            "properties": {"xs": {"type": "array", "items": {"type": "string", "description": BANNED_IN}}},
        },
    ],
    ids=["property-description", "enum-value", "nested-items-description"],
)
def test_tool_parameter_texts_are_scanned(proxy, upstream, parameters: dict[str, Any]) -> None:
    tool = {"type": "function", "function": {"name": "f", "description": "looks things up", "parameters": parameters}}
    for path in ("/api/chat", "/v1/chat/completions"):
        body = {"model": "m", "stream": False, "messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
        assert httpx.post(proxy.url + path, json=body).status_code == 403, path


def test_generate_template_and_suffix_are_scanned(proxy) -> None:
    for key in ("template", "suffix", "system"):
        body = {"model": "m", "stream": False, "prompt": "hi", key: f"x {BANNED_IN}"}
        assert httpx.post(proxy.url + "/api/generate", json=body).status_code == 403, key


# -- 4. output events are parsed and scanned, or end the stream ---------------------------------------------

STREAMED = [
    ("/api/chat", lambda s: {"model": "m", "messages": [{"role": "user", "content": s}]}),
    ("/api/generate", lambda s: {"model": "m", "prompt": s}),
    ("/v1/chat/completions", lambda s: {"model": "m", "stream": True, "messages": [{"role": "user", "content": s}]}),
    ("/v1/completions", lambda s: {"model": "m", "stream": True, "prompt": s}),
]


def _native(path: str, text: str, done: bool = False, **extra: Any) -> str:
    body: dict[str, Any] = {"model": "m", "done": done, **extra}
    if path == "/api/chat":
        body["message"] = {"role": "assistant", "content": text}
    else:
        body["response"] = text
    return json.dumps(body)


def _openai(path: str, text: str, **extra: Any) -> str:
    choice = {"index": 0, "delta": {"content": text}} if "chat" in path else {"index": 0, "text": text}
    return json.dumps(
        {"id": "x", "object": "chunk", "model": "m", "choices": [{**choice, "finish_reason": None}], **extra}
    )


def _script(path: str, hostile: str) -> list[str]:
    """A stream: a clean chunk, the hostile line, a chunk carrying the banned word, the end."""
    if path.startswith("/api/"):
        return [_native(path, "Hello there. "), hostile, _native(path, f" {BANNED_OUT}"), _native(path, "", done=True)]
    return [_openai(path, "Hello there. "), hostile, _openai(path, f" {BANNED_OUT}"), "[DONE]"]


HOSTILE = {
    "error-null-with-text": lambda path: (
        _native(path, f" {BANNED_OUT}", error=None)
        if path.startswith("/api/")
        else _openai(path, f" {BANNED_OUT}", error=None)
    ),
    "truncated-json": lambda path: '{"model":"m","message":{"role":"assistant","content":" ' + BANNED_OUT,
    "not-an-object": lambda path: json.dumps([BANNED_OUT]),
    "error-event": lambda path: json.dumps({"error": f"runner failed near {BANNED_OUT}"}),
}


@pytest.mark.parametrize("hostile", list(HOSTILE), ids=list(HOSTILE))
@pytest.mark.parametrize(("path", "make"), STREAMED, ids=[p for p, _ in STREAMED])
def test_an_upstream_event_is_never_released_unscanned(proxy, path: str, make: Any, hostile: str) -> None:
    lines = _script(path, HOSTILE[hostile](path))
    r = httpx.post(proxy.url + path, json=make("RAWLINES: " + json.dumps(lines)))
    assert r.status_code == 200
    assert BANNED_OUT not in r.text  # neither in a text field nor in raw bytes
    if hostile != "error-null-with-text":  # (that one is scanned, and stops the stream as a violation)
        assert "Hello there." in r.text  # what passed before the unreadable event still arrives
    last = [line for line in r.text.splitlines() if line.strip()]
    if path.startswith("/api/"):
        tail = json.loads(last[-1])
        assert tail.get("error") or tail.get("done_reason") == "guard_blocked", tail
    else:
        assert last[-1] == "data: [DONE]"


@pytest.mark.parametrize(("path", "make"), STREAMED, ids=[p for p, _ in STREAMED])
def test_a_stream_that_ends_without_its_final_event_ends_with_an_error(proxy, path: str, make: Any) -> None:
    one = _native(path, "Hello there.") if path.startswith("/api/") else _openai(path, "Hello there.")
    r = httpx.post(proxy.url + path, json=make("RAWLINES: " + json.dumps([one])))
    tail = [line for line in r.text.splitlines() if line.strip()]
    assert "Hello there." in r.text
    if path.startswith("/api/"):
        assert "error" in json.loads(tail[-1])
    else:
        assert tail[-1] == "data: [DONE]" and "error" in tail[-2]


def test_an_upstream_error_text_is_scanned_and_shown(proxy) -> None:
    lines = [_native("/api/chat", "Hi."), json.dumps({"error": f"model crashed, token {GITHUB}"})]
    r = httpx.post(proxy.url + "/api/chat", json=STREAMED[0][1]("RAWLINES: " + json.dumps(lines)))
    tail = json.loads(r.text.splitlines()[-1])
    assert "model crashed" in tail["error"] and GITHUB not in tail["error"]


# -- the property: every fold variant of every key, at every depth, of every route ----------------------------


def _paths(schema: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every struct key path in a request schema (list items at index 0, map values under key "p")."""
    out: list[tuple[Any, ...]] = []
    if isinstance(schema, dict):
        for key, sub in schema.items():
            out.append((*prefix, key))
            out += _paths(sub, (*prefix, key))
    elif isinstance(schema, list):
        out += _paths(schema[0], (*prefix, 0))
    elif isinstance(schema, MapOf):
        out += _paths(schema.values, (*prefix, "p"))
    return out


ROUTE_OF = {
    ("ollama", "generate"): "/api/generate",
    ("ollama", "chat"): "/api/chat",
    ("ollama", "embed"): "/api/embed",
    ("ollama", "embeddings"): "/api/embeddings",
    ("openai", "chat"): "/v1/chat/completions",
    ("openai", "completion"): "/v1/completions",
    ("openai", "embed"): "/v1/embeddings",
}
CASES = [(ROUTE_OF[k], path) for k, schema in REQUESTS.items() for path in _paths(schema) if path[-1] != "model"]


def _set(body: Any, path: tuple[Any, ...], key: str, value: Any) -> Any:
    """`body` with the last key of `path` renamed to `key` and holding `value` (containers made on the way)."""
    node = body
    for step, nxt in zip(path[:-1], path[1:], strict=True):
        if isinstance(step, int):
            while len(node) <= step:
                node.append({})
            node = node[step]
        else:
            if not isinstance(node.get(step), dict | list):
                node[step] = [] if isinstance(nxt, int) else {}
            node = node[step]
    node[key] = value
    return body


def _variant(key: str, data: st.DataObject) -> str:
    letters = [c for c in key if c.isalpha()]
    if not letters:
        return key
    flips = data.draw(st.lists(st.sampled_from(range(len(key))), min_size=1, max_size=3))
    out = list(key)
    for i in flips:
        c = out[i]
        out[i] = {"s": "ſ", "k": "\u212a"}.get(c, c.upper()) if data.draw(st.booleans()) else c.swapcase()
    return "".join(out)


@settings(
    # Derandomized: CI runs the examples run here (3,000 passed with MEDIATION_EXAMPLES=3000).
    derandomize=True,
    max_examples=int(os.environ.get("MEDIATION_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_no_fold_variant_of_any_key_carries_text_past_the_guard(proxy, upstream, data: st.DataObject) -> None:
    route, path = data.draw(st.sampled_from(CASES))
    key = _variant(str(path[-1]), data)
    base: dict[str, Any] = {"model": "m", "stream": False}
    if route in ("/api/chat", "/v1/chat/completions"):
        base["messages"] = [{"role": "user", "content": "hi"}]
    body = _set(base, path, key, f"{BANNED_IN} said {BANNED_IN}")
    before = len(upstream.requests)
    r = httpx.post(proxy.url + route, content=json.dumps(body, ensure_ascii=False).encode())
    assert r.status_code < 500, r.text
    assert not [t for t in upstream_saw(upstream, before) if BANNED_IN in t], (route, path, key, r.status_code)
    if key != path[-1] and r.status_code == 200:
        # Forwarded: the variant key was dropped or refused, never read by Ollama as the field.
        assert all(key not in json.loads(req["raw"]) for req in upstream.requests[before:])


def test_the_fake_ollama_reads_bodies_as_go_does() -> None:
    """The double behaves like Ollama where it matters: case-insensitive keys, last match wins, unknown keys
    dropped, a repeated struct merged into the first."""
    from ollama_guard.dialects import ROUTES
    from ollama_guard.mediation import go_decode

    gen = ROUTES["/api/generate"]
    assert go_decode(b'{"model":"m","prompt":"a","Prompt":"b"}', gen)["prompt"] == "b"
    assert go_decode('{"model":"m","ſystem":"x"}'.encode(), gen)["system"] == "x"
    assert "zzz" not in go_decode(b'{"model":"m","zzz":1}', gen)
    chat = ROUTES["/api/chat"]
    decoded = go_decode(
        b'{"model":"m","tools":[{"function":{"name":"a","description":"d"},"Function":{"name":"b"}}],'
        b'"options":{"a":1},"OPTIONS":{"b":2}}',
        chat,
    )
    assert decoded["tools"][0]["function"] == {"name": "b", "description": "d"}
    assert decoded["options"] == {"a": 1, "b": 2}
