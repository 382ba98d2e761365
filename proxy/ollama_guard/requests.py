"""Strict validation of guarded request bodies, and where in them the texts to scan are.

The body is first read as Ollama reads it (mediation.canonical_body: letter-case variants of a field are
refused, unknown keys dropped); what goes upstream is serialised from that reading. Every text the model
reads is a scan target by default: user, system/developer, assistant (its content, thinking and tool-call
arguments) and tool messages, tool and parameter descriptions and enum values, and /api/generate's prompt,
system, template and suffix. Each kind but user text can be exempted by setting (`scan_*`). Non-text fields
(images, format, options, think, keep_alive ...) are type-checked loosely and passed on as values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from .dialects import BadRequest, Route
from .mediation import canonical_body
from .settings import Settings

_ROLES = {"system", "user", "assistant", "tool", "developer"}


@dataclass
class Target:
    """One text in the body: where it is, so a sanitized text can be put back."""

    container: Any
    key: Any
    role: str
    where: str = ""  # its place in the body ("messages[3].content"): named when it is blocked, never its text

    @property
    def text(self) -> str:
        return self.container[self.key]

    def set(self, value: str) -> None:
        self.container[self.key] = value


@dataclass
class JsonTarget(Target):
    """A JSON object in the body read as its text (native tool-call arguments in the history)."""

    @property
    def text(self) -> str:
        return orjson.dumps(self.container[self.key]).decode()

    def set(self, value: str) -> None:
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise BadRequest(
                "a sanitizer rewrote tool-call arguments in the conversation into text that is no longer JSON",
                403,
                "prompt_blocked",
            ) from None
        self.container[self.key] = parsed


@dataclass
class GuardedRequest:
    route: Route
    body: dict[str, Any]
    model: str
    stream: bool
    targets: list[Target] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        """The text output scanners compare an answer with: the last user text."""
        for t in reversed(self.targets):
            if t.role == "user":
                return t.text
        return self.targets[-1].text if self.targets else ""


def parse_json(raw: bytes, route: Route) -> dict[str, Any]:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "utf-8" in str(exc).lower() or "surrogate" in str(exc).lower():
            raise BadRequest("request body is not valid UTF-8") from None
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequest("request body must be a JSON object")
    return obj


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise BadRequest(message)


class Validator:
    def __init__(self, settings: Settings):
        self.limits = settings.limits
        self.model_re = re.compile(settings.limits.model_name_pattern)
        self.scan_roles = {"user"}
        if settings.scan_system_messages:
            self.scan_roles |= {"system", "developer"}
        if settings.scan_assistant_messages:
            self.scan_roles.add("assistant")
        if settings.scan_tool_messages:
            self.scan_roles.add("tool")
        self.scan_tool_definitions = settings.scan_tool_definitions
        self.allow_context = settings.allow_generate_context

    def _text(self, value: Any, what: str, index: int | None = None) -> str:
        """`value`, which must be a string of at most `limits.max_prompt_chars` characters; raises BadRequest
        naming `what` (with `index` in place of its `{}`) otherwise."""
        if isinstance(value, str) and len(value) <= self.limits.max_prompt_chars:
            return value
        if index is not None:
            what = what.format(index)
        _expect(isinstance(value, str), f"{what} must be a string")
        raise BadRequest(f"{what} is longer than {self.limits.max_prompt_chars} characters")

    def parse(self, raw: bytes, route: Route) -> GuardedRequest:
        body = canonical_body(parse_json(raw, route), route)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("model is required and must be a string")
        _expect(bool(self.model_re.match(model)), "model name has characters that are not allowed")
        stream = body.get("stream", route.stream_default)
        _expect(isinstance(stream, bool), "stream must be a boolean")
        for key, kinds in (("options", dict), ("keep_alive", (str, int, float)), ("tools", list)):
            if key in body and body[key] is not None:
                _expect(isinstance(body[key], kinds), f"{key} has the wrong type")
        req = GuardedRequest(route, body, model, stream)
        getattr(self, f"_{route.dialect}_{route.kind}")(req)
        return req

    # ---- Ollama ----------------------------------------------------------------------------------------
    def _messages(self, req: GuardedRequest, required: bool) -> list[tuple[int, dict[str, Any], str]]:
        """(index, message, role) for each message, after the checks both dialects share."""
        messages = req.body.get("messages", None if required else [])
        if not isinstance(messages, list) or (required and not messages):
            raise BadRequest("messages must be a non-empty list" if required else "messages must be a list")
        if len(messages) > self.limits.max_messages:
            raise BadRequest(f"too many messages: at most {self.limits.max_messages}")
        out = []
        # The checks run on every message of a conversation's history: the messages are formatted only when one fails.
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise BadRequest(f"messages[{i}] must be an object")
            role = m.get("role")
            if not (isinstance(role, str) and role in _ROLES):
                raise BadRequest(f"messages[{i}].role is not a valid role")
            out.append((i, m, role))
        return out

    def _tool_descriptions(self, req: GuardedRequest) -> None:
        """The tools a request offers are rendered into the model's prompt: each tool's description, and every
        description and enum value in its parameter schema (at any depth, `items` and `$defs` included), are
        scanned (role "tool_definition"). Tool and parameter names are identifiers and are not scanned."""
        if not self.scan_tool_definitions:
            return
        for i, tool in enumerate(req.body.get("tools") or []):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(fn, dict):
                continue
            self._schema_texts(req, fn, f"tools[{i}].function", 0)

    def _schema_texts(self, req: GuardedRequest, node: Any, where: str, depth: int) -> None:
        _expect(depth <= 32, f"{where} is nested too deeply")
        if isinstance(node, list):
            for j, item in enumerate(node):
                self._schema_texts(req, item, f"{where}[{j}]", depth + 1)
            return
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key == "description" and value is not None:
                # A string in Ollama's structs; anything else is refused rather than passed unread.
                self._text(value, f"{where}.description")
                if value:
                    req.targets.append(Target(node, key, "tool_definition", f"{where}.description"))
            elif key == "enum" and value is not None:
                _expect(isinstance(value, list), f"{where}.enum must be a list")
                for j, option in enumerate(value):
                    if isinstance(option, str) and option:
                        self._text(option, f"{where}.enum[{j}]")
                        req.targets.append(Target(value, j, "tool_definition", f"{where}.enum[{j}]"))
            elif isinstance(value, dict | list):
                self._schema_texts(req, value, f"{where}.{key}", depth + 1)

    def _history_tool_calls(self, req: GuardedRequest, i: int, m: dict[str, Any], native: bool) -> None:
        """Tool calls an assistant turn in the history made: their arguments are rendered back to the model."""
        calls = m.get("tool_calls")
        if calls is None:
            return
        _expect(isinstance(calls, list), f"messages[{i}].tool_calls must be a list")
        if "assistant" not in self.scan_roles:
            return
        for j, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict):
                raise BadRequest(f"messages[{i}].tool_calls[{j}].function must be an object")
            args = fn.get("arguments")
            if args is None:
                continue
            if native:
                _expect(isinstance(args, dict), f"messages[{i}].tool_calls[{j}].function.arguments must be an object")
                if args:
                    req.targets.append(JsonTarget(fn, "arguments", "assistant", f"messages[{i}].tool_calls[{j}]"))
            else:
                self._text(args, f"messages[{i}].tool_calls[{j}].function.arguments")
                if args:
                    req.targets.append(Target(fn, "arguments", "assistant", f"messages[{i}].tool_calls[{j}]"))

    def _thinking(self, req: GuardedRequest, i: int, m: dict[str, Any], key: str, role: str) -> None:
        """A reasoning model's thoughts in the history: the model reads them back."""
        value = m.get(key)
        if value is None:
            return
        self._text(value, f"messages[{i}].{key}")
        if value and role in self.scan_roles:
            req.targets.append(Target(m, key, role, f"messages[{i}].{key}"))

    def _ollama_chat(self, req: GuardedRequest) -> None:
        self._tool_descriptions(req)
        for i, m, role in self._messages(req, required=False):
            if m.get("content") is not None:
                self._text(m["content"], "messages[{}].content", i)
                if role in self.scan_roles:
                    req.targets.append(Target(m, "content", role, f"messages[{i}].content"))
            elif role in self.scan_roles and not m.get("tool_calls"):
                raise BadRequest(f"messages[{i}].content is required")
            self._thinking(req, i, m, "thinking", role)
            self._history_tool_calls(req, i, m, native=True)
            images = m.get("images")
            if images is not None:
                _expect(
                    isinstance(images, list) and all(isinstance(x, str) for x in images),
                    f"messages[{i}].images must be a list of strings",
                )

    def _ollama_generate(self, req: GuardedRequest) -> None:
        # A caller's own prompt template is text the model reads like the prompt: scanned as such.
        for key, role in (("system", "system"), ("template", "user"), ("prompt", "user"), ("suffix", "user")):
            value = req.body.get(key)
            if value is None:
                continue
            self._text(value, key)
            if role in self.scan_roles and value:
                req.targets.append(Target(req.body, key, role, key))
        context = req.body.get("context")
        if context is not None:
            _expect(
                isinstance(context, list) and all(type(x) is int for x in context),
                "context must be a list of token ids",
            )
            _expect(
                not context or self.allow_context,
                "context token arrays cannot be scanned, so they are refused: "
                "send the conversation as messages to /api/chat",
            )
        images = req.body.get("images")
        if images is not None:
            _expect(
                isinstance(images, list) and all(isinstance(x, str) for x in images),
                "images must be a list of strings",
            )

    def _ollama_embed(self, req: GuardedRequest) -> None:
        self._inputs(req, "input", allow_tokens=False)

    def _ollama_embeddings(self, req: GuardedRequest) -> None:
        value = req.body.get("prompt", "")
        self._text(value, "prompt")
        if value:
            req.targets.append(Target(req.body, "prompt", "user", "prompt"))

    # ---- OpenAI ----------------------------------------------------------------------------------------
    def _openai_choices(self, req: GuardedRequest) -> None:
        # Every choice would need scanning; Ollama returns one, and so does the guard.
        n = req.body.get("n")
        _expect(n is None or (type(n) is int and n == 1), "only n = 1 is supported")

    def _openai_chat(self, req: GuardedRequest) -> None:
        self._openai_choices(req)
        reasoning = req.body.get("reasoning")
        _expect(reasoning is None or isinstance(reasoning, dict), "reasoning must be an object ({effort})")
        self._tool_descriptions(req)
        for i, m, role in self._messages(req, required=True):
            for key in ("reasoning", "reasoning_content"):
                self._thinking(req, i, m, key, role)
            self._history_tool_calls(req, i, m, native=False)
            content = m.get("content")
            if content is None:
                _expect(
                    role not in self.scan_roles or bool(m.get("tool_calls")),
                    f"messages[{i}].content is required",
                )
                continue
            if isinstance(content, str):
                self._text(content, "messages[{}].content", i)
                if role in self.scan_roles:
                    req.targets.append(Target(m, "content", role, f"messages[{i}].content"))
                continue
            _expect(isinstance(content, list), f"messages[{i}].content must be a string or a list of parts")
            for j, part in enumerate(content):
                _expect(
                    isinstance(part, dict) and isinstance(part.get("type"), str),
                    f"messages[{i}].content[{j}] must be an object with a type",
                )
                if part["type"] == "text":
                    self._text(part.get("text"), f"messages[{i}].content[{j}].text")
                    if role in self.scan_roles:
                        req.targets.append(Target(part, "text", role, f"messages[{i}].content[{j}]"))
                elif part["type"] not in ("image_url", "input_image"):
                    raise BadRequest(f"messages[{i}].content[{j}].type {part['type']!r} is not supported")

    def _openai_completion(self, req: GuardedRequest) -> None:
        self._openai_choices(req)
        self._inputs(req, "prompt", allow_tokens=False)
        if req.body.get("suffix") is not None:
            self._text(req.body["suffix"], "suffix")
            req.targets.append(Target(req.body, "suffix", "user", "suffix"))

    def _openai_embed(self, req: GuardedRequest) -> None:
        self._inputs(req, "input", allow_tokens=False)

    def _inputs(self, req: GuardedRequest, key: str, allow_tokens: bool) -> None:
        value = req.body.get(key)
        _expect(value is not None, f"{key} is required")
        if isinstance(value, str):
            self._text(value, key)
            req.targets.append(Target(req.body, key, "user", key))
            return
        if not isinstance(value, list):
            raise BadRequest(f"{key} must be a string or a list of strings")
        _expect(
            len(value) <= self.limits.max_messages,
            f"too many {key} items: at most {self.limits.max_messages}",
        )
        for i, item in enumerate(value):
            # Token-id inputs cannot be scanned as text: refused rather than passed unscanned.
            _expect(isinstance(item, str), f"{key}[{i}] must be a string (token arrays are not accepted)")
            self._text(item, f"{key}[{i}]")
            req.targets.append(Target(value, i, "user", f"{key}[{i}]"))
