"""A model's thinking and its tool-call arguments reach the client too, so they are scanned like the answer.

Every generating route that can carry them x stream on/off: a banned word in the thinking or in a tool call's
arguments never reaches the client; a secret there is redacted in place, with the arguments still valid JSON;
clean thinking, answer and tool calls arrive whole and in order. Answer-only scanners (JSON) judge the answer,
not the thinking.
"""

from __future__ import annotations

import json

import httpx
import orjson
import pytest
from ollama_guard.dialects import ROUTES, split_parts

from .policies import AWS, BANNED_OUT, INPUT, pure

# How a native stream the guard stopped ends its text (stream_stop_notice, answer_blocked_message).
NOTICE = "\n\nThe answer was stopped by the guard."

pytestmark = pytest.mark.slow

ROUTES_WITH_THINKING = ["/api/chat", "/api/generate", "/v1/chat/completions"]
ROUTES_WITH_TOOLS = ["/api/chat", "/v1/chat/completions"]


def body_for(path: str, script: str, stream: bool, chunk_chars: int = 5) -> dict:
    body: dict = {"model": "m", "stream": stream, "options": {"fake_chunk_chars": chunk_chars}}
    body["metadata"] = {"fake_chunk_chars": chunk_chars}
    if path == "/api/generate":
        body["prompt"] = script
    else:
        body["messages"] = [{"role": "user", "content": script}]
    if path.startswith("/v1"):
        del body["options"]
    return body


def events(content: bytes) -> list[dict]:
    """The JSON objects of an NDJSON or SSE stream, in order."""
    out = []
    for line in content.splitlines():
        line = line.strip()
        if line and line != b"data: [DONE]":
            out.append(orjson.loads(line[5:] if line.startswith(b"data:") else line))
    return out


def received(path: str, content: bytes, stream: bool) -> dict:
    """Everything the client got: thinking, answer, tool calls (arguments parsed), and the order of kinds."""
    out: dict = {"thinking": "", "content": "", "tools": [], "order": []}
    for obj in events(content) if stream else [orjson.loads(content)]:
        if "error" in obj:
            continue
        if path == "/api/generate":
            holder = obj
            kinds = {"thinking": "thinking", "content": "response"}
        elif path == "/api/chat":
            holder = obj.get("message") or {}
            kinds = {"thinking": "thinking", "content": "content"}
        else:
            c = obj["choices"][0]
            holder = c.get("delta") or c.get("message") or {}
            kinds = {"thinking": "reasoning", "content": "content"}
        for kind, key in kinds.items():
            if holder.get(key):
                out[kind] += holder[key]
                if not out["order"] or out["order"][-1] != kind:
                    out["order"].append(kind)
        for call in holder.get("tool_calls") or []:
            args = call["function"]["arguments"]
            out["tools"].append((call["function"]["name"], json.loads(args) if isinstance(args, str) else args))
            out["order"].append("tools")
    return out


@pytest.fixture(scope="module")
def proxy(upstream):
    from ollama_guard.settings import load_settings

    from .conftest import ProxyThread

    # No Secrets on input here, so the scripted secrets reach the fake model and come back in its output.
    policy = {**pure(ollama_url=upstream.url), "input_scanners": [s for s in INPUT if s["type"] != "Secrets"]}
    p = ProxyThread(load_settings(overrides=policy, environ={})).start()
    yield p
    p.stop()


def assert_stopped(r: httpx.Response, path: str, stream: bool) -> None:
    if not stream:
        assert r.status_code == 403 and r.headers["x-guard-decision"] == "blocked; scanners=BanSubstrings"
        return
    assert r.status_code == 200
    last = r.content.strip().splitlines()[-1]
    if path.startswith("/v1"):
        assert last == b"data: [DONE]" and b'"code":"output_blocked"' in r.content
    else:
        assert orjson.loads(last)["done_reason"] == "guard_blocked"


@pytest.mark.parametrize("chunk_chars", [3, 40])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("path", ROUTES_WITH_THINKING)
def test_banned_word_in_thinking_never_reaches_the_client(proxy, upstream, path, stream, chunk_chars):
    script = f"THINK: Let me think about this at some length first. Then {BANNED_OUT} slips out. || REPLY: Fine."
    r = httpx.post(proxy.url + path, json=body_for(path, script, stream, chunk_chars))
    assert b"FORBIDDEN" not in r.content and b"ANSWER" not in r.content
    got = received(path, r.content, stream)
    # The answer after the stopped thinking never went out either; a native stream ends with the notice.
    assert got["content"] == (NOTICE if stream and path.startswith("/api/") else "")
    assert_stopped(r, path, stream)


def ask_with_secret(proxy, upstream, path: str, script: str, stream: bool) -> tuple[httpx.Response, dict]:
    """Send a script whose answer holds the AWS key: the model says it, the client must not see it."""
    r = httpx.post(proxy.url + path, json=body_for(path, script, stream))
    assert r.status_code == 200 and AWS.encode() not in r.content
    assert AWS in str(upstream.requests[-1]["body"])  # the model did get it, and did say it
    return r, received(path, r.content, stream)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("path", ROUTES_WITH_THINKING)
def test_secret_in_thinking_is_redacted_in_the_thinking(proxy, upstream, path, stream):
    script = f"THINK: The key they gave me is {AWS} and I should not repeat it. || REPLY: I cannot share keys."
    r, got = ask_with_secret(proxy, upstream, path, script, stream)
    assert got["thinking"].startswith("The key they gave me is ") and "******" in got["thinking"]
    assert got["thinking"].endswith("and I should not repeat it.")
    assert got["content"] == "I cannot share keys."
    assert got["order"] == ["thinking", "content"]
    if not stream:  # a stream's headers go out before its answer is scanned
        assert r.headers["x-guard-decision"] == "sanitized; scanners=Secrets"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("path", ROUTES_WITH_TOOLS)
def test_banned_word_in_tool_arguments_never_reaches_the_client(proxy, path, stream):
    script = f'REPLY: Looking it up. || TOOL: search {{"query": "{BANNED_OUT} near me"}}'
    r = httpx.post(proxy.url + path, json=body_for(path, script, stream))
    assert b"FORBIDDEN" not in r.content
    got = received(path, r.content, stream)
    assert got["tools"] == []
    assert_stopped(r, path, stream)
    if stream:  # the answer before the call had passed: it went out, then the stream stopped
        assert got["content"] == "Looking it up." + (NOTICE if path.startswith("/api/") else "")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("path", ROUTES_WITH_TOOLS)
def test_secret_in_tool_arguments_is_redacted_and_arguments_stay_json(proxy, upstream, path, stream):
    script = f'REPLY: Deploying. || TOOL: deploy {{"region": "eu", "aws_key": "{AWS}", "count": 2}}'
    _, got = ask_with_secret(proxy, upstream, path, script, stream)
    ((name, args),) = got["tools"]  # arguments parsed back: still valid JSON, still an object
    assert name == "deploy" and args["region"] == "eu" and args["count"] == 2
    assert args["aws_key"] != AWS and "******" in args["aws_key"]
    assert got["order"] == ["content", "tools"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("path", ROUTES_WITH_TOOLS)
def test_clean_thinking_answer_and_tool_calls_arrive_whole_and_in_order(proxy, upstream, path, stream):
    thoughts = "First I consider the weather service. It needs a city. " * 3
    answer = "Let me check the weather for you."
    script = f'THINK: {thoughts} || REPLY: {answer} || TOOL: get_weather {{"city": "Paris", "days": [1, 2]}}'
    r = httpx.post(proxy.url + path, json=body_for(path, script, stream))
    assert r.status_code == 200
    got = received(path, r.content, stream)
    assert got["thinking"] == thoughts.strip() and got["content"] == answer
    assert got["tools"] == [("get_weather", {"city": "Paris", "days": [1, 2]})]
    assert got["order"] == ["thinking", "content", "tools"]
    if stream:  # nothing was sanitized: the chunks went out as Ollama sent them, the end included
        direct = httpx.post(upstream.url + path, json=body_for(path, script, stream))

        def timeless(content: bytes) -> list[dict]:
            return [{k: v for k, v in e.items() if k not in ("created_at", "created")} for e in events(content)]

        assert timeless(r.content) == timeless(direct.content)


def test_answer_only_scanners_judge_the_answer_not_the_thinking(start_proxy):
    policy = pure()
    json_answer = {"type": "JSON", "action": "block", "params": {"required_elements": 1}}
    policy["output_scanners"] = [*policy["output_scanners"], json_answer]
    p = start_proxy(**policy)
    script = 'THINK: The user wants JSON, so I answer with an object. || REPLY: {"ok": true}'
    for stream in (False, True):
        r = httpx.post(p.url + "/api/chat", json=body_for("/api/chat", script, stream))
        got = received("/api/chat", r.content, stream)
        assert r.status_code == 200 and got["content"] == '{"ok": true}'
        assert got["thinking"] == "The user wants JSON, so I answer with an object."
    # The same scanner still judges the answer itself.
    r = httpx.post(p.url + "/api/chat", json=body_for("/api/chat", "REPLY: not json at all", False))
    assert r.status_code == 403 and "JSON" in r.headers["x-guard-decision"]


def test_official_ollama_client_gets_redacted_thinking_and_tool_calls(proxy):
    import ollama

    client = ollama.Client(host=proxy.url)
    script = f'THINK: Key {AWS} seen. || REPLY: Calling the tool. || TOOL: store {{"key": "{AWS}"}}'
    parts = list(client.chat(model="m", messages=[{"role": "user", "content": script}], stream=True))
    thinking = "".join(p.message.thinking or "" for p in parts)
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert AWS not in thinking and thinking.startswith("Key ") and thinking.endswith(" seen.")
    assert [c.function.name for c in calls] == ["store"] and AWS not in calls[0].function.arguments["key"]
    assert parts[-1].done


def test_official_openai_client_gets_redacted_tool_arguments(proxy):
    import openai

    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused")
    script = f'REPLY: Sure. || TOOL: store {{"key": "{AWS}"}}'
    out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": script}])
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "store" and AWS not in json.loads(call.function.arguments)["key"]
    assert out.choices[0].finish_reason == "tool_calls"


def test_a_chunk_with_thinking_content_and_the_end_splits_in_order():
    route = ROUTES["/api/chat"]
    chunk = {
        "model": "m",
        "message": {"role": "assistant", "thinking": "t", "content": "c", "tool_calls": [{"function": {}}]},
        "done": True,
        "done_reason": "stop",
        "eval_count": 3,
    }
    parts = split_parts(route, chunk)
    assert [(k, t) for k, t, _ in parts] == [("thinking", "t"), ("content", "c"), ("tools", "")]
    assert [p["done"] for _, _, p in parts] == [False, False, True]
    assert parts[0][2]["message"] == {"role": "assistant", "thinking": "t", "content": ""}
    assert parts[1][2]["message"] == {"role": "assistant", "thinking": "", "content": "c"}
    assert parts[2][2] == {**chunk, "message": {**chunk["message"], "thinking": "", "content": ""}}
    assert "done_reason" not in parts[0][2] and "eval_count" not in parts[1][2]
    assert chunk["message"]["thinking"] == "t"  # the original is left as it was


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_call_whose_redaction_breaks_its_json_is_refused_not_sent_broken(start_proxy, stream):
    # A redacting Regex that eats a quote: the sanitized arguments are no longer JSON, so no call goes out.
    redact_quoted_key = {
        "type": "Regex",
        "action": "sanitize",
        "params": {"patterns": ['"aws_key"'], "is_blocked": True, "redact": True},
    }
    p = start_proxy(input_scanners=[], output_scanners=[redact_quoted_key])
    script = 'REPLY: Deploying. || TOOL: deploy {"aws_key": "abc"}'
    r = httpx.post(p.url + "/api/chat", json=body_for("/api/chat", script, stream))
    got = received("/api/chat", r.content, stream)
    assert got["tools"] == [] and b"deploy" not in r.content
    if stream:
        assert orjson.loads(r.content.strip().splitlines()[-1])["done_reason"] == "guard_blocked"
    else:
        assert r.status_code == 403 and r.headers["x-guard-decision"] == "blocked; scanners=Regex"


def _chunk_shapes() -> list:
    """Chunks of every shape a stream may carry, well-formed or not, for each place a route keeps its text."""
    values = [None, "", "text", 3, [], ["x"], {}, {"a": 1}]
    holders = []
    for field in ("content", "response", "text", "thinking", "reasoning", "reasoning_content", "tool_calls"):
        for v in values:
            holders.append({field: v})
            holders.append({"content": "answer", "response": "answer", "text": "answer", field: v})
    shapes: list = [{}, {"done": True}]
    for h in holders:
        shapes += [h, {"message": h}, {"choices": [{"delta": h}]}, {"choices": [{"message": h}]}, {"choices": [h]}]
    shapes += [{"message": v} for v in values] + [{"choices": v} for v in values]
    return shapes


@pytest.mark.parametrize("path", sorted(ROUTES))
def test_a_routes_text_reader_reads_every_chunk_as_the_generic_reading_does(path: str) -> None:
    # The stream's common chunk is read by a reader made once per route (dialects.answer_text_reader); it must
    # say what answer_only_text says of every chunk: the text, "" for none, None for thinking or tool calls.
    from ollama_guard.dialects import answer_only_text, answer_text_reader

    route = ROUTES[path]
    read = answer_text_reader(route)
    for shape in _chunk_shapes():
        assert read(shape) == answer_only_text(route, shape), shape
