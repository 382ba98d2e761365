"""What a person sees when the guard acts, through clients that show only text (Open WebUI's native
connection keeps only `message.content`) and through the official clients.
"""

from __future__ import annotations

import json

import httpx
import ollama
import openai

from .policies import BANNED_IN, BANNED_OUT, pure

NOTICE = "The answer was stopped by the guard."


def chat_body(text: str, **extra):
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


def test_a_stopped_native_stream_ends_with_a_visible_notice_on_its_own_line(start_proxy) -> None:
    p = start_proxy(**pure())
    script = f"REPLY: Rollout follows once the p{BANNED_OUT} is done."
    chunks = list(
        ollama.Client(host=p.url).chat(model="m", messages=[{"role": "user", "content": script}], stream=True)
    )
    text = "".join(c.message.content or "" for c in chunks)
    assert text.endswith("\n\n" + NOTICE) and BANNED_OUT not in text
    assert chunks[-1].done and chunks[-1].done_reason == "guard_blocked"
    # The machine-readable fields stay, for clients that read them (raw NDJSON).
    raw = httpx.post(p.url + "/api/chat", json=chat_body(script))
    final = json.loads(raw.text.splitlines()[-1])
    assert final["guard"] == {"decision": "blocked", "blocked_by": ["BanSubstrings"]}


def test_the_notice_can_be_turned_off_or_reworded(start_proxy) -> None:
    script = f"REPLY: Some text, then {BANNED_OUT}."
    off = start_proxy(**pure(stream_stop_notice=False))
    text = "".join(
        json.loads(line).get("message", {}).get("content", "")
        for line in httpx.post(off.url + "/api/chat", json=chat_body(script)).text.splitlines()
    )
    assert NOTICE not in text
    worded = start_proxy(**pure(answer_blocked_message="[withheld]"))
    text = "".join(
        json.loads(line).get("message", {}).get("content", "")
        for line in httpx.post(worded.url + "/api/chat", json=chat_body(script)).text.splitlines()
    )
    assert text.endswith("\n\n[withheld]")


def test_blocked_response_message_is_apart_from_the_cut_word_and_says_what_happened(start_proxy) -> None:
    p = start_proxy(**pure(blocked_response="message"))
    cut = f"REPLY: Rollout follows once the p{BANNED_OUT}."
    for path, read in (
        (
            "/api/chat",
            lambda r: "".join(json.loads(x).get("message", {}).get("content", "") for x in r.text.splitlines()),
        ),
        (
            "/v1/chat/completions",
            lambda r: "".join(
                (json.loads(x[5:])["choices"][0].get("delta") or {}).get("content") or ""
                for x in r.text.splitlines()
                if x.startswith("data: {") and json.loads(x[5:]).get("choices")
            ),
        ),
    ):
        r = httpx.post(p.url + path, json=chat_body(cut, stream=True))
        assert read(r).endswith("\n\n" + NOTICE), read(r)
    whole = httpx.post(p.url + "/api/chat", json=chat_body(cut, stream=False)).json()
    assert whole["message"]["content"] == NOTICE  # the answer, not the request
    prompt = httpx.post(p.url + "/api/chat", json=chat_body(f"tell me {BANNED_IN}", stream=False)).json()
    assert prompt["message"]["content"] == "This request was blocked by the guard."


def test_a_blocked_prompt_names_the_message_to_edit_never_its_text(start_proxy) -> None:
    p = start_proxy(**pure())
    history = [
        {"role": "user", "content": f"please {BANNED_IN}"},
        {"role": "assistant", "content": "I cannot."},
        {"role": "user", "content": "ok, something else then"},
    ]
    try:
        ollama.Client(host=p.url).chat(model="m", messages=history)
        raise AssertionError("not refused")
    except ollama.ResponseError as err:
        assert err.status_code == 403 and "messages[0].content" in err.error and BANNED_IN not in err.error
    client = openai.OpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0)
    try:
        client.chat.completions.create(model="m", messages=history)
        raise AssertionError("not refused")
    except openai.PermissionDeniedError as err:
        assert "messages[0].content" in str(err) and BANNED_IN not in str(err)
