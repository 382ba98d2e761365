"""Real HTTP end to end with the official `ollama` and `openai` clients as callers, streaming and not."""

from __future__ import annotations

import httpx
import ollama
import openai
import pytest

from .policies import AWS, BANNED_IN, BANNED_OUT, pure

pytestmark = pytest.mark.slow


@pytest.fixture
def proxy(start_proxy):
    return start_proxy(**pure())


def test_ollama_chat_streams_through_the_guard(proxy):
    client = ollama.Client(host=proxy.url)
    parts = list(client.chat(model="llama3.2", messages=[{"role": "user", "content": "hello"}], stream=True))
    assert (
        "".join(p.message.content for p in parts) == "The capital of France is Paris. It is known for the Eiffel Tower."
    )
    assert parts[-1].done and parts[-1].done_reason == "stop"


def test_ollama_chat_non_streaming(proxy):
    r = ollama.Client(host=proxy.url).chat(model="llama3.2", messages=[{"role": "user", "content": "REPLY: fine"}])
    assert r.message.content == "fine"


def test_ollama_generate_and_embed(proxy):
    client = ollama.Client(host=proxy.url)
    assert client.generate(model="llama3.2", prompt="REPLY: generated").response == "generated"
    streamed = "".join(c.response for c in client.generate(model="llama3.2", prompt="REPLY: in pieces", stream=True))
    assert streamed == "in pieces"
    assert len(client.embed(model="llama3.2", input=["a", "b"]).embeddings) == 2
    assert client.embeddings(model="llama3.2", prompt="a").embedding == [0.1, 0.2, 0.3]


def test_ollama_client_sees_blocked_prompt_as_error_naming_scanner(proxy, upstream):
    before = len(upstream.requests)
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=proxy.url).chat(model="llama3.2", messages=[{"role": "user", "content": BANNED_IN}])
    assert err.value.status_code == 403
    assert "BanSubstrings" in str(err.value) and BANNED_IN not in str(err.value)
    assert len(upstream.requests) == before  # never forwarded


def test_ollama_stream_stopped_by_guard_ends_well_formed(proxy):
    parts = list(
        ollama.Client(host=proxy.url).chat(
            model="llama3.2",
            stream=True,
            messages=[{"role": "user", "content": f"REPLY: safe words first. then {BANNED_OUT} and more"}],
        )
    )
    text = "".join(p.message.content for p in parts)
    assert BANNED_OUT not in text and "FORBIDDEN" not in text
    assert parts[-1].done and parts[-1].done_reason == "guard_blocked"


def test_openai_chat_streaming_and_not(proxy):
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused")
    r = client.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "REPLY: plain"}])
    assert r.choices[0].message.content == "plain"
    chunks = list(
        client.chat.completions.create(
            model="llama3.2", stream=True, messages=[{"role": "user", "content": "REPLY: streamed answer"}]
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "streamed answer"
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("answer", ["streamed answer", f"the key {AWS} is redacted"], ids=["clean", "redacted"])
def test_openai_stream_usage_chunk_arrives_last(start_proxy, answer):
    """stream_options.include_usage: Ollama ends with a chunk that has usage and no choices; it comes through
    last, whether the chunks went out as sent or were rebuilt after a redaction."""
    # No Secrets on input here, so the key reaches the fake model and comes back in its answer.
    p = start_proxy(**{**pure(), "input_scanners": []})
    client = openai.OpenAI(base_url=p.url + "/v1", api_key="unused")
    chunks = list(
        client.chat.completions.create(
            model="llama3.2",
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": f"REPLY: {answer}"}],
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.replace(AWS, "******")
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_openai_completions_embeddings_models(proxy):
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused")
    assert client.completions.create(model="llama3.2", prompt="REPLY: done").choices[0].text == "done"
    text = "".join(
        c.choices[0].text for c in client.completions.create(model="llama3.2", prompt="REPLY: sse", stream=True)
    )
    assert text == "sse"
    assert len(client.embeddings.create(model="llama3.2", input=["x", "y"]).data) == 2
    assert [m.id for m in client.models.list()] == ["llama3.2:latest"]


def test_openai_blocked_prompt_is_permission_error(proxy):
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": BANNED_IN}])
    assert err.value.body["code"] == "prompt_blocked"
    assert err.value.response.headers["x-guard-decision"] == "blocked; scanners=BanSubstrings"


def test_openai_stream_stopped_by_guard_raises_api_error(proxy):
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    received = []
    with pytest.raises(openai.APIError) as err:
        for c in client.chat.completions.create(
            model="llama3.2",
            stream=True,
            messages=[{"role": "user", "content": f"REPLY: a fine start. {BANNED_OUT}"}],
        ):
            received.append(c.choices[0].delta.content or "")
    assert "guard" in str(err.value)
    assert "FORBIDDEN" not in "".join(received)


def test_secrets_are_redacted_before_forwarding(proxy, upstream):
    with httpx.Client(base_url=proxy.url) as c:
        r = c.post(
            "/api/chat",
            json={
                "model": "llama3.2",
                "stream": False,
                "messages": [{"role": "user", "content": f"deploy with {AWS} please"}],
            },
        )
    assert r.status_code == 200
    assert r.headers["x-guard-decision"] == "sanitized; scanners=Secrets"
    forwarded = upstream.requests[-1]["body"]["messages"][0]["content"]
    assert AWS not in forwarded and "******" in forwarded


def test_passthrough_is_byte_for_byte_with_headers(proxy, upstream):
    direct = httpx.get(upstream.url + "/api/tags")
    via = httpx.get(proxy.url + "/api/tags")
    assert via.status_code == 200 and via.content == direct.content
    assert via.headers["x-fake"] == "tags" and via.headers["content-type"] == direct.headers["content-type"]
    assert httpx.head(proxy.url + "/").status_code == 200
    assert httpx.get(proxy.url + "/").text == "Ollama is running"
    assert httpx.get(proxy.url + "/api/version").json() == {"version": "0.12.6"}


def test_model_management_refused_unless_enabled(proxy, start_proxy, upstream):
    r = httpx.post(proxy.url + "/api/pull", json={"model": "llama3.2"})
    assert r.status_code == 403 and "management" in r.json()["error"]
    open_proxy = start_proxy(**pure(management={"allow_model_management": True}))
    r = httpx.post(open_proxy.url + "/api/pull", json={"model": "llama3.2"})
    assert r.status_code == 200 and r.text.strip().endswith('{"status":"success"}')


def test_unknown_routes_are_not_forwarded(proxy, upstream):
    before = len(upstream.requests)
    r = httpx.post(proxy.url + "/api/unknown-new-endpoint", json={"prompt": BANNED_IN})
    assert r.status_code == 404 and len(upstream.requests) == before
