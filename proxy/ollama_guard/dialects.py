"""The two API dialects the proxy speaks: Ollama's native API and its OpenAI-compatible /v1 API.

For each: how errors look, where the text sits in requests, responses and stream chunks, and how a stream
the guard stopped ends. Pure functions over parsed JSON; no I/O.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

OLLAMA = "ollama"
OPENAI = "openai"


class BadRequest(Exception):
    """The client's request is malformed: answered 4xx in its dialect, never forwarded."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


def error_body(dialect: str, message: str, code: str, etype: str = "invalid_request_error") -> bytes:
    if dialect == OPENAI:
        return orjson.dumps({"error": {"message": message, "type": etype, "param": None, "code": code}})
    return orjson.dumps({"error": message})


def now_rfc3339() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z"


@dataclass(frozen=True)
class Route:
    """Where the text is for one guarded endpoint."""

    path: str
    dialect: str
    kind: str  # chat | generate | embed | completion
    stream_default: bool


ROUTES: dict[str, Route] = {
    "/api/chat": Route("/api/chat", OLLAMA, "chat", True),
    "/api/generate": Route("/api/generate", OLLAMA, "generate", True),
    "/api/embed": Route("/api/embed", OLLAMA, "embed", False),
    "/api/embeddings": Route("/api/embeddings", OLLAMA, "embeddings", False),
    "/v1/chat/completions": Route("/v1/chat/completions", OPENAI, "chat", False),
    "/v1/completions": Route("/v1/completions", OPENAI, "completion", False),
    "/v1/embeddings": Route("/v1/embeddings", OPENAI, "embed", False),
}


# ---- where answers carry text ------------------------------------------------------------------------
#
# An answer (or stream chunk) carries text the client sees in up to three places, all scanned:
# - ``content``: the answer itself;
# - ``thinking``: a reasoning model's thoughts (native ``thinking``, OpenAI-compatible ``reasoning``);
# - tool calls: the arguments the model wrote for each call (native: a JSON object, OpenAI: a JSON string).

CONTENT = "content"
THINKING = "thinking"
_OPENAI_THINKING = ("reasoning", "reasoning_content")


def _holder(route: Route, obj: Any, create: bool = False) -> dict[str, Any] | None:
    """The dict in a chunk that holds its text fields (the message, the delta, the choice or the chunk)."""
    if not isinstance(obj, dict):
        return None
    if route.dialect == OLLAMA:
        if route.kind != "chat":
            return obj
        msg = obj.get("message")
        if not isinstance(msg, dict) and create:
            msg = obj["message"] = {"role": "assistant"}
        return msg if isinstance(msg, dict) else None
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        if not create:
            return None
        choices = obj["choices"] = [{"index": 0}]
    c = choices[0]
    if route.kind != "chat":
        return c
    key = "delta" if "delta" in c or obj.get("object") == "chat.completion.chunk" else "message"
    part = c.get(key)
    if not isinstance(part, dict) and create:
        part = c[key] = {"role": "assistant"}
    return part if isinstance(part, dict) else None


def _key(route: Route, holder: dict[str, Any], channel: str) -> str:
    if channel == CONTENT:
        if route.dialect == OLLAMA:
            return "content" if route.kind == "chat" else "response"
        return "content" if route.kind == "chat" else "text"
    if route.dialect == OLLAMA:
        return "thinking"
    return next((k for k in _OPENAI_THINKING if k in holder), _OPENAI_THINKING[0])


def chunk_parts(route: Route, obj: Any) -> list[tuple[str, str]]:
    """(channel, text) for each non-empty text a chunk or answer carries: thinking first, then content."""
    holder = _holder(route, obj)
    return [] if holder is None else _holder_parts(route, holder)


def _holder_parts(route: Route, holder: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for channel in (THINKING, CONTENT):
        text = holder.get(_key(route, holder, channel))
        if isinstance(text, str) and text:
            out.append((channel, text))
    return out


def tool_calls(route: Route, obj: Any) -> list[Any]:
    holder = _holder(route, obj)
    return [] if holder is None else _holder_calls(holder)


def _holder_calls(holder: dict[str, Any]) -> list[Any]:
    calls = holder.get("tool_calls")
    return calls if isinstance(calls, list) else []


def tool_call_texts(route: Route, obj: Any) -> list[str]:
    """The text of each tool call's arguments, as scanned: a JSON object's serialisation, or the string."""
    out = []
    for call in tool_calls(route, obj):
        fn = call.get("function") if isinstance(call, dict) else None
        args = fn.get("arguments") if isinstance(fn, dict) else None
        if args is None:
            out.append("")
        elif isinstance(args, str):
            out.append(args)
        else:
            out.append(orjson.dumps(args).decode())
    return out


def with_tool_call_texts(route: Route, obj: dict[str, Any], texts: list[str]) -> dict[str, Any] | None:
    """A copy with each tool call's arguments replaced by a sanitized text, or None when a sanitized text no
    longer has the arguments' shape (a JSON object that stopped parsing): such a call cannot be sent."""
    out = _copy_path(route, obj)
    holder = _holder(route, out)
    assert holder is not None
    calls = []
    for call, text in zip(holder["tool_calls"], texts, strict=True):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or fn.get("arguments") is None:
            calls.append(call)
            continue
        if not isinstance(fn["arguments"], str):
            try:
                args: Any = orjson.loads(text)
            except orjson.JSONDecodeError:
                return None
            if type(args) is not type(fn["arguments"]):
                return None
        else:
            args = text
        calls.append({**call, "function": {**fn, "arguments": args}})
    holder["tool_calls"] = calls
    return out


def _copy_path(route: Route, obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of a chunk deep enough that its text holder (and the path to it) can be changed."""
    out = dict(obj)
    if route.dialect == OLLAMA:
        if route.kind == "chat" and isinstance(out.get("message"), dict):
            out["message"] = dict(out["message"])
        return out
    if isinstance(out.get("choices"), list):
        out["choices"] = [dict(c) if isinstance(c, dict) else c for c in out["choices"]]
        c = out["choices"][0] if out["choices"] else None
        if route.kind == "chat" and isinstance(c, dict):
            for key in ("delta", "message"):
                if isinstance(c.get(key), dict):
                    c[key] = dict(c[key])
    return out


def with_text(route: Route, obj: dict[str, Any], text: str, channel: str = CONTENT) -> dict[str, Any]:
    """A copy of a chunk or response with the text of one channel replaced; every other field kept."""
    out = _copy_path(route, obj)
    holder = _holder(route, out, create=True)
    assert holder is not None
    holder[_key(route, holder, channel)] = text
    return out


def answer_only_text(route: Route, obj: Any) -> str | None:
    """The answer text of a chunk that carries no thinking and no tool calls ("" when it carries no text), or
    None for a chunk that does carry them: `split_parts` without building its parts, for the stream's common
    chunk."""
    holder = _holder(route, obj)
    if holder is None:
        return ""
    if _holder_calls(holder):
        return None
    thinking = holder.get(_key(route, holder, THINKING))
    if isinstance(thinking, str) and thinking:
        return None
    text = holder.get(_key(route, holder, CONTENT))
    return text if isinstance(text, str) else ""


def answer_text_reader(route: Route) -> Callable[[Any], str | None]:
    """`answer_only_text` for one route, as a function of the chunk alone: a native route's fields looked up
    once, not on every chunk of its streams (the OpenAI-compatible ones pick their keys per chunk)."""
    if route.dialect != OLLAMA:
        return functools.partial(answer_only_text, route)
    content = _key(route, {}, CONTENT)
    chat = route.kind == "chat"

    def read(obj: Any) -> str | None:
        holder = obj.get("message") if chat else obj
        if type(holder) is not dict:
            return ""
        calls = holder.get("tool_calls")
        if type(calls) is list and calls:
            return None
        thinking = holder.get("thinking")
        if type(thinking) is str and thinking:
            return None
        text = holder.get(content)
        return text if type(text) is str else ""

    return read


def split_parts(route: Route, obj: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """A chunk as (kind, text, chunk) parts, one per kind of text it carries, in order: "thinking" and
    "content" with their text, "tools" (text ""). A chunk with one kind or none is returned whole (kind ""
    for none); one with several is split, and only the last part keeps the end-of-stream fields."""
    holder = _holder(route, obj)
    if holder is None:  # no text, no tool calls
        return [("", "", obj)]
    texts = _holder_parts(route, holder)
    has_tools = bool(_holder_calls(holder))
    if len(texts) + has_tools <= 1:
        if texts:
            return [(texts[0][0], texts[0][1], obj)]
        return [("tools" if has_tools else "", "", obj)]
    kinds = [ch for ch, _ in texts] + (["tools"] if has_tools else [])
    by_kind = dict(texts)
    parts = []
    for i, kind in enumerate(kinds):
        part = _copy_path(route, obj)
        holder = _holder(route, part)
        assert holder is not None
        for other in kinds:
            if other == kind:
                continue
            if other == "tools":
                holder.pop("tool_calls", None)
            else:
                holder[_key(route, holder, other)] = ""
        if i < len(kinds) - 1:
            _not_last(route, part)
        parts.append((kind, by_kind.get(kind, ""), part))
    return parts


def _not_last(route: Route, part: dict[str, Any]) -> None:
    if route.dialect == OLLAMA:
        if part.get("done"):
            part["done"] = False
            for k in list(part):
                if k == "done_reason" or k.endswith("_duration") or k.endswith("_count") or k == "context":
                    del part[k]
        return
    part.pop("usage", None)
    c = part["choices"][0]
    if c.get("finish_reason") is not None:
        c["finish_reason"] = None


def text_template(route: Route, obj: dict[str, Any], model: str) -> dict[str, Any]:
    """The fields a rebuilt text chunk copies from the stream: identity, never text, tool calls or the end."""
    if route.dialect == OLLAMA:
        base = {"model": obj.get("model", model), "created_at": obj.get("created_at") or now_rfc3339()}
        if route.kind == "chat":
            return {**base, "message": {"role": "assistant", "content": ""}, "done": False}
        return {**base, "response": "", "done": False}
    tmpl = {k: v for k, v in obj.items() if k in ("id", "object", "created", "model", "system_fingerprint")}
    tmpl.setdefault("model", model)
    if route.kind == "chat":
        return {**tmpl, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
    return {**tmpl, "choices": [{"index": 0, "text": "", "finish_reason": None}]}


def stopped_stream_tail(
    route: Route,
    template: dict[str, Any] | None,
    model: str,
    scanners: list[str],
    notice: str | None,
    as_answer: bool = False,
    separate: bool = True,
) -> list[bytes]:
    """The well-formed end of a stream the guard stopped, in the route's framing.

    NDJSON: `notice` (if any) as a last text chunk, then the final chunk with `done_reason: "guard_blocked"`
    and `guard: {blocked_by, decision}`. SSE: with `as_answer`, `notice` as a last text chunk and
    `finish_reason: content_filter`; otherwise an `error` event; then `data: [DONE]`. `separate` puts the
    notice on a line of its own, apart from the word the stream was cut at."""
    names = ",".join(scanners)
    text = f"\n\n{notice}" if notice and separate else notice
    if route.dialect == OLLAMA:
        base = {"model": model, "created_at": now_rfc3339()}
        out = []
        if text:
            out.append(encode_ndjson(with_text(route, {**base, "done": False}, text)))
        final = with_text(route, {**base}, "")
        final.update(
            {"done": True, "done_reason": "guard_blocked", "guard": {"decision": "blocked", "blocked_by": scanners}}
        )
        out.append(encode_ndjson(final))
        return out
    base = text_template(route, template or {}, model)
    if as_answer and text:
        text_chunk = with_text(route, base, text)
        end = {
            **{k: v for k, v in base.items() if k != "choices"},
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "content_filter",
                    **({"delta": {}} if route.kind == "chat" else {"text": ""}),  # type: ignore[dict-item]
                }
            ],
        }
        return [encode_sse(text_chunk), encode_sse(end), b"data: [DONE]\n\n"]
    err = {
        "error": {
            "message": f"The answer was stopped by the guard ({names}).",
            "type": "guard_violation",
            "param": None,
            "code": "output_blocked",
        }
    }
    return [encode_sse(err), b"data: [DONE]\n\n"]


def encode_ndjson(obj: Any) -> bytes:
    return orjson.dumps(obj) + b"\n"


def encode_sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def blocked_message_response(route: Route, model: str, message: str) -> bytes:
    """A normal, non-streamed answer that says the request was blocked (blocked_response: message)."""
    if route.dialect == OLLAMA:
        base: dict[str, Any] = {
            "model": model,
            "created_at": now_rfc3339(),
            "done": True,
            "done_reason": "guard_blocked",
        }
        return orjson.dumps(with_text(route, base, message))
    now = int(time.time())
    if route.kind == "chat":
        return orjson.dumps(
            {
                "id": f"chatcmpl-guard-{now}",
                "object": "chat.completion",
                "created": now,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": message},
                        "finish_reason": "content_filter",
                    }
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            }
        )
    return orjson.dumps(
        {
            "id": f"cmpl-guard-{now}",
            "object": "text_completion",
            "created": now,
            "model": model,
            "choices": [{"index": 0, "text": message, "finish_reason": "content_filter"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
    )


def blocked_message_stream(route: Route, model: str, message: str) -> list[bytes]:
    if route.dialect == OLLAMA:
        base: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
        return [
            encode_ndjson(with_text(route, {**base, "done": False}, message)),
            encode_ndjson({**with_text(route, base, ""), "done": True, "done_reason": "guard_blocked"}),
        ]
    return stopped_stream_tail(route, None, model, [], message, as_answer=True, separate=False)
