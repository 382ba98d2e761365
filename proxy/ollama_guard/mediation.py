"""One reading of a guarded request body, the same one Ollama makes, and the body the guard sends upstream.

Ollama is written in Go and decodes request bodies with `encoding/json` into structs. Go matches an object
key to a struct field by exact name or, failing that, case-insensitively under Unicode simple folding
(`Prompt`, `PROMPT`, `ſystem` with U+017F and `Kelvin` with U+212A all reach a field), and when several keys
reach one field the last one wins (Go encoding/json documentation, "Unmarshal": "preferring an exact match
but also accepting a case-insensitive match"; `foldName` in encoding/json/fold.go). Map keys (`options`,
tool-call `arguments`, `format`) are taken as they are.

So a body can say one thing to a reader that takes keys literally and another to Ollama. The guard closes
that gap in `canonical_body`:

- a key that is not a field's exact name but folds to one, at any depth of the struct tree, is refused with
  a 400 (the client meant that field, or is trying to hide text behind it);
- exact duplicates are read as Go and our JSON parser both read them: the last one wins;
- keys that are no field of Ollama's request struct are dropped: Ollama would ignore them, and sending only
  the fields the guard knows means nothing can ride past it in a field added to Ollama later;
- the body sent upstream is serialised from this reading, after the scanned texts were put back (sanitized
  where a sanitizer changed them), never the client's bytes.

The struct trees below are Ollama's request types: `ollama/api/types.go` (GenerateRequest, ChatRequest,
Message, ToolCall, Tool, ToolFunction, ToolProperty, EmbedRequest, EmbeddingRequest) and, for /v1,
`ollama/openai/openai.go` (ChatCompletionRequest, Message, ToolCall, CompletionRequest, EmbedRequest),
plus the OpenAI request fields that OpenAI clients send and Ollama ignores (forwarded as values).

`go_decode` is the reverse, for the fake Ollama and the tests: it reads a raw body the way Go would, so a test
can check what the model would have seen.
"""

from __future__ import annotations

import json
from typing import Any

from .dialects import BadRequest, Route

# A schema is a struct (dict: field -> schema), an array of a schema ([schema]), a map with struct values
# (MapOf(schema): keys are data, taken exactly) or None (a value Go does not decode into a struct: a string,
# a number, `any`, json.RawMessage, map[string]any).


class MapOf:
    """A JSON object whose keys are data (Go map[string]T), with struct values."""

    __slots__ = ("values",)

    def __init__(self, values: dict[str, Any]):
        self.values = values


Schema = dict[str, Any] | list[Any] | MapOf | None

_TOOL_PROPERTY: dict[str, Any] = {"type": None, "items": None, "description": None, "enum": None}
TOOL: dict[str, Any] = {
    "type": None,
    "items": None,
    "function": {
        "name": None,
        "description": None,
        "parameters": {
            "type": None,
            "$defs": None,
            "items": None,
            "required": None,
            "properties": MapOf(_TOOL_PROPERTY),
        },
    },
}
_COMMON = {
    "model": None,
    "stream": None,
    "format": None,
    "keep_alive": None,
    "options": None,
    "think": None,
    "truncate": None,
    "shift": None,
    "logprobs": None,
    "top_logprobs": None,
    "_debug_render_only": None,
}
_MESSAGE: dict[str, Any] = {
    "role": None,
    "content": None,
    "thinking": None,
    "images": None,
    "tool_calls": [{"id": None, "function": {"index": None, "name": None, "arguments": None}}],
    "tool_name": None,
    "tool_call_id": None,
}
_OPENAI_PART = {"type": None, "text": None, "image_url": None}
_OPENAI_MESSAGE: dict[str, Any] = {
    "role": None,
    "content": None,  # a string, or a list of parts (checked as structs below)
    "reasoning": None,
    "reasoning_content": None,
    "tool_calls": [{"id": None, "index": None, "type": None, "function": {"name": None, "arguments": None}}],
    "name": None,
    "tool_call_id": None,
}
# Request fields of OpenAI's API that Ollama ignores but clients send: known, so they are checked for
# letter-case variants like any field and forwarded as values.
_OPENAI_EXTRA = dict.fromkeys(
    [
        "n",
        "user",
        "tool_choice",
        "parallel_tool_calls",
        "max_completion_tokens",
        "metadata",
        "store",
        "logit_bias",
        "service_tier",
        "modalities",
        "prediction",
        "audio",
        "echo",
        "best_of",
        "encoding_format",
    ]
)
_OPENAI_SAMPLING = dict.fromkeys(
    [
        "stream_options",
        "max_tokens",
        "seed",
        "stop",
        "temperature",
        "frequency_penalty",
        "presence_penalty",
        "top_p",
        "logprobs",
        "top_logprobs",
        "_debug_render_only",
    ]
)

REQUESTS: dict[tuple[str, str], dict[str, Any]] = {
    ("ollama", "generate"): {
        **_COMMON,
        "prompt": None,
        "suffix": None,
        "system": None,
        "template": None,
        "context": None,
        "raw": None,
        "images": None,
        "width": None,
        "height": None,
        "steps": None,
    },
    ("ollama", "chat"): {**_COMMON, "messages": [_MESSAGE], "tools": [TOOL]},
    ("ollama", "embed"): {
        "model": None,
        "input": None,
        "truncate": None,
        "keep_alive": None,
        "dimensions": None,
        "options": None,
    },
    ("ollama", "embeddings"): {"model": None, "prompt": None, "keep_alive": None, "options": None},
    ("openai", "chat"): {
        "model": None,
        "messages": [_OPENAI_MESSAGE],
        "stream": None,
        "response_format": None,
        "tools": [TOOL],
        "reasoning": {"effort": None},  # settings, not text: the model never reads them
        "reasoning_effort": None,
        **_OPENAI_SAMPLING,
        **_OPENAI_EXTRA,
    },
    ("openai", "completion"): {
        "model": None,
        "prompt": None,
        "suffix": None,
        "stream": None,
        **_OPENAI_SAMPLING,
        **_OPENAI_EXTRA,
    },
    ("openai", "embed"): {"model": None, "input": None, "dimensions": None, **_OPENAI_EXTRA},
}

# Go's simple folding maps these two non-ASCII letters onto ASCII ones (unicode.SimpleFold orbits
# {S, s, ſ} and {K, k, K}); every other non-ASCII letter folds only to non-ASCII letters, so it can never
# reach one of the ASCII field names above.
_GO_FOLD = str.maketrans({"ſ": "s", "K": "k"})


def fold(key: str) -> str:
    """`key` as Go's encoding/json compares it with a field name (ASCII field names only)."""
    return key.lower() if key.isascii() else key.translate(_GO_FOLD).lower()


_FOLDED: dict[int, dict[str, str]] = {}


def _folded(struct: dict[str, Any]) -> dict[str, str]:
    table = _FOLDED.get(id(struct))
    if table is None:
        table = _FOLDED[id(struct)] = {fold(k): k for k in struct}
    return table


def _where(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Clash(Exception):
    """A key that folds to a field without being it, found at the innermost level; each level on the way out
    adds its step to `steps` (innermost first), so paths are built only for a refusal, never per key."""

    def __init__(self, key: str, meant: str) -> None:
        super().__init__(key)
        self.key, self.meant = key, meant
        self.steps: list[str] = []  # ".key", "[3]" or "['k']"

    def refusal(self, prefix: str = "") -> BadRequest:
        path = prefix
        for step in reversed(self.steps):
            path = path + step if step[0] == "[" else _where(path, step[1:])
        return BadRequest(
            f"{_where(path, self.key)!r} differs from the field {_where(path, self.meant)!r} only in letter "
            f"case; Ollama would read it as {self.meant!r}, so it is refused: send {self.meant!r} once"
        )


def _canonical(value: Any, schema: Schema) -> Any:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return value  # a wrong type: the route's validation says so
        out: dict[str, Any] = {}
        for key, sub in value.items():
            if key in schema:
                inner = schema[key]
                if inner is None:  # a leaf: taken as it is
                    out[key] = sub
                    continue
                try:
                    out[key] = _canonical(sub, inner)
                except _Clash as clash:
                    clash.steps.append("." + key)
                    raise
                continue
            meant = _folded(schema).get(fold(key))
            if meant is not None:
                raise _Clash(key, meant)
            # Not a field of Ollama's request: Ollama would ignore it, and the guard does not send it.
        return out
    if isinstance(schema, list):
        if not isinstance(value, list):
            return value
        items = []
        for i, item in enumerate(value):
            try:
                items.append(_canonical(item, schema[0]))
            except _Clash as clash:
                clash.steps.append(f"[{i}]")
                raise
        return items
    if isinstance(schema, MapOf):
        if not isinstance(value, dict):
            return value
        mapped = {}
        for k, v in value.items():
            try:
                mapped[k] = _canonical(v, schema.values)
            except _Clash as clash:
                clash.steps.append(f"[{k!r}]")
                raise
        return mapped
    return value


def canonical_body(body: dict[str, Any], route: Route) -> dict[str, Any]:
    """The body as Ollama reads it, keeping only the fields of its request struct.

    Shape: the same JSON object, minus unknown keys (at every struct depth). Raises BadRequest (400) for a
    key that differs from a field name only in letter case (Go's folding), at any depth.
    """
    try:
        out = _canonical(body, REQUESTS[(route.dialect, route.kind)])
    except _Clash as clash:
        raise clash.refusal() from None
    if route.dialect == "openai" and route.kind == "chat":
        # Content parts are maps in Ollama (read by exact key); checked as structs all the same, stricter.
        for i, message in enumerate(out.get("messages") or []):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    try:
                        parts.append(_canonical(part, _OPENAI_PART))
                    except _Clash as clash:
                        raise clash.refusal(f"messages[{i}].content[{j}]") from None
                message["content"] = parts
    return out


# ---- Go's reading, for the fake Ollama and the tests ------------------------------------------------------


def go_decode(raw: bytes, route: Route) -> dict[str, Any]:
    """Decode `raw` the way Ollama's Go server would: keys to fields by exact name, else by simple folding;
    the last key reaching a field wins; a repeated struct-valued field is decoded into the same struct (so
    fields of the first one survive unless the second sets them), a repeated map field merges, a repeated
    array is replaced; keys reaching no field are dropped. Returns the struct tree as a dict with canonical
    field names. Raises ValueError for a body that is not a JSON object."""
    pairs = json.loads(raw, object_pairs_hook=lambda p: _Pairs(p))
    if not isinstance(pairs, _Pairs):
        raise ValueError("the body is not a JSON object")
    return _go(pairs, REQUESTS[(route.dialect, route.kind)], None)


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object as its (key, value) pairs in order, duplicates kept."""


def _plain(value: Any) -> Any:
    """A value decoded into `any` or map[string]any: Go keeps the last of duplicate keys."""
    if isinstance(value, _Pairs):
        out: dict[str, Any] = {}
        for k, v in value:
            out[k] = _plain(v)
        return out
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _go(value: Any, schema: Schema, into: Any) -> Any:
    if isinstance(schema, dict):
        if not isinstance(value, _Pairs):
            return _plain(value)
        out: dict[str, Any] = dict(into) if isinstance(into, dict) else {}
        folded = _folded(schema)
        for key, sub in value:
            field = key if key in schema else folded.get(fold(key))
            if field is not None:
                out[field] = _go(sub, schema[field], out.get(field))
        return out
    if isinstance(schema, list):
        if not isinstance(value, list):
            return _plain(value)
        return [_go(item, schema[0], None) for item in value]
    if isinstance(schema, MapOf):
        if not isinstance(value, _Pairs):
            return _plain(value)
        merged: dict[str, Any] = dict(into) if isinstance(into, dict) else {}
        for k, v in value:
            merged[k] = _go(v, schema.values, merged.get(k))
        return merged
    plain = _plain(value)
    if isinstance(plain, dict) and isinstance(into, dict):
        return {**into, **plain}  # map[string]any decoded twice: Go reuses the map
    return plain
