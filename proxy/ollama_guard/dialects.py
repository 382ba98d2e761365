"""The two API dialects the proxy speaks: Ollama's native API and its OpenAI-compatible /v1 API.

For each: how errors look, where the text sits in requests, responses and stream chunks, and how a stream
the guard stopped ends. Pure functions over parsed JSON; no I/O.
"""

from __future__ import annotations

import time
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


# ---- stream chunk codecs --------------------------------------------------------------------------------


def chunk_text(route: Route, obj: Any) -> str | None:
    """The answer text a response or stream chunk carries, or None where it carries none."""
    if not isinstance(obj, dict):
        return None
    if route.dialect == OLLAMA:
        if route.kind == "chat":
            msg = obj.get("message")
            text = msg.get("content") if isinstance(msg, dict) else None
        else:
            text = obj.get("response")
        return text if isinstance(text, str) and text else None
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    c = choices[0]
    if route.kind == "chat":
        part = c.get("delta") if "delta" in c else c.get("message")
        text = part.get("content") if isinstance(part, dict) else None
    else:
        text = c.get("text")
    return text if isinstance(text, str) and text else None


def with_text(route: Route, obj: dict[str, Any], text: str) -> dict[str, Any]:
    """A copy of a chunk or response with its answer text replaced; every other field kept."""
    out = dict(obj)
    if route.dialect == OLLAMA:
        if route.kind == "chat":
            msg = dict(out.get("message") or {"role": "assistant"})
            msg["content"] = text
            out["message"] = msg
        else:
            out["response"] = text
        return out
    choices = [dict(c) for c in out.get("choices") or [{"index": 0}]]
    c = choices[0]
    if route.kind == "chat":
        key = "delta" if "delta" in c or out.get("object") == "chat.completion.chunk" else "message"
        part = dict(c.get(key) or {"role": "assistant"})
        part["content"] = text
        c[key] = part
    else:
        c["text"] = text
    out["choices"] = choices
    return out


def stopped_stream_tail(
    route: Route, template: dict[str, Any] | None, model: str, scanners: list[str], message: str | None
) -> list[bytes]:
    """The well-formed end of a stream the guard stopped, in the route's framing."""
    names = ",".join(scanners)
    if route.dialect == OLLAMA:
        base = {"model": model, "created_at": now_rfc3339()}
        out = []
        if message:
            out.append(encode_ndjson(with_text(route, {**base, "done": False}, message)))
        final = with_text(route, {**base}, "")
        final.update({"done": True, "done_reason": "guard_blocked", "guard": {"blocked_by": scanners}})
        out.append(encode_ndjson(final))
        return out
    tmpl = {
        k: v
        for k, v in (template or {}).items()
        if k in ("id", "object", "created", "model", "system_fingerprint")
    }
    tmpl.setdefault("model", model)
    if message:
        text_chunk = with_text(
            route,
            {**tmpl, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
            message,
        )
        if route.kind != "chat":
            text_chunk = {**tmpl, "choices": [{"index": 0, "text": message, "finish_reason": None}]}
        end = {
            **tmpl,
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
    return stopped_stream_tail(route, None, model, [], message)
