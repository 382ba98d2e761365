"""A fake Ollama that speaks Ollama's exact wire formats: native NDJSON and the OpenAI-compatible SSE.

Used by the tests, the benchmarks and the in-cluster e2e. The answer is scripted by the last user text:
- ``REPLY: <text>``: answer exactly <text> (``\\n`` escapes allowed);
- ``REPEAT <n>: <text>``: answer <text> repeated n times;
- ``RAWLINES: <JSON list of strings>``: stream exactly these lines (each framed as an NDJSON line or an SSE
  ``data:`` event) and end, as a broken or hostile upstream would;
- ``FAULT:<name>`` anywhere in a request body: fail the way real upstreams fail, on any route (``FAULTS``);
- anything else: a fixed harmless answer.
A text may also script thinking and tool calls, in parts separated by `` || ``: ``THINK: <thoughts> ||
REPLY: <answer> || TOOL: <name> <JSON object of arguments>``. Thinking streams first (native ``thinking``,
OpenAI-compatible ``reasoning``), then the answer, then one chunk with the tool calls, as Ollama sends them.
Guard models (a model name starting ``llama-guard``, ``shieldgemma`` or ``granite3-guardian``) answer as
those models do through Ollama: Llama Guard ``safe`` or ``unsafe\nS<n>`` (``GUARD-UNSAFE`` or
``GUARD-UNSAFE-S<n>`` in any message makes it unsafe), ShieldGemma and Granite Guardian ``Yes``/``No``;
``GUARD-MALFORMED`` makes any of them answer out of format. ``/api/show`` of a model named ``missing...``
is a 404, as Ollama answers for a model it does not have.
Options ``fake_chunk_chars`` (default 4) sets the stream chunk size; ``fake_delay_ms`` a delay per chunk
(on /v1 chat: ``metadata.fake_chunk_chars``); ``fake_stall_after`` (native streams) a number of chunks after
which the stream goes silent for 60 s with its connection open, as a model runner hung mid-answer does.
Every request is recorded (``requests``) so tests can check what reached Ollama; run standalone, it records none.

Run standalone: ``python -m ollama_guard.testing.fake_ollama --port 11434``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from typing import Any

import orjson
from aiohttp import web

from ..dialects import ROUTES
from ..mediation import go_decode

DEFAULT_ANSWER = "The capital of France is Paris. It is known for the Eiffel Tower."
MODELS = [
    {
        "name": "llama3.2:latest",
        "model": "llama3.2:latest",
        "modified_at": "2025-01-01T00:00:00.000000000Z",
        "size": 2019393189,
        "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "3.2B",
            "quantization_level": "Q4_K_M",
        },
    }
]


def _created_at() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e9):09d}Z"


def script_answer(text: str) -> str:
    text = text.strip()
    if text.startswith("REPLY:"):
        return text[6:].strip().replace("\\n", "\n")
    if text.startswith("REPEAT"):
        head, _, body = text.partition(":")
        n = int(head.split()[1])
        return body.strip().replace("\\n", "\n") * n
    return DEFAULT_ANSWER


class Script:
    """What the fake model answers: thoughts, the answer text, and tool calls as (name, arguments)."""

    def __init__(self, text: str) -> None:
        self.thinking = ""
        self.answer = ""
        self.tools: list[tuple[str, dict[str, Any]]] = []
        if "||" not in text and not text.strip().startswith(("THINK:", "TOOL:")):
            self.answer = script_answer(text)
            return
        for part in text.split("||"):
            part = part.strip()
            if part.startswith("THINK:"):
                self.thinking += part[6:].strip().replace("\\n", "\n")
            elif part.startswith("TOOL:"):
                name, _, args = part[5:].strip().partition(" ")
                self.tools.append((name, orjson.loads(args or "{}")))
            else:
                self.answer += script_answer(part)

    def native_calls(self) -> list[dict[str, Any]]:
        return [{"function": {"name": n, "arguments": a}} for n, a in self.tools]

    def openai_calls(self, stream: bool) -> list[dict[str, Any]]:
        return [
            {
                **({"index": i} if stream else {}),
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": n, "arguments": orjson.dumps(a).decode()},
            }
            for i, (n, a) in enumerate(self.tools)
        ]


FAULTS = {
    "short-body": "200 headers with Content-Length 196, then 65 bytes, then the connection closes",
    "stall-body": "200 headers with Content-Length 196, then 65 bytes, then nothing for 60 s",
    "no-answer": "nothing at all for 60 s (not even headers)",
    "reset": "the connection closes before any answer",
    "http500-json": 'HTTP 500 {"error": "llama runner process has terminated: FAULT-TEXT"}',
    "http500-text": "HTTP 500 with a plain-text traceback",
    "http404-json": 'HTTP 404 {"error": "model \'m\' not found, try pulling it first"}',
    "garbage": "HTTP 200 application/json whose body is not JSON",
    "empty": "HTTP 200 with an empty body",
    "gzip-lie": "HTTP 200 claiming Content-Encoding: gzip, with a plain body",
    "set-cookie": "the normal answer with a Set-Cookie, as an auth gateway in front of Ollama sends one",
    "utf8-header": "the normal answer with a header whose value is UTF-8 text, not latin-1 (X-Gateway-Note)",
}
UTF8_NOTE = "caf\u00e9 \u2615 \u0441\u0435\u0440\u0432\u0435\u0440"  # sent as its UTF-8 bytes
_FAULT_RE = re.compile(rb"FAULT:([a-z0-9-]+)")


@web.middleware
async def faults(request: web.Request, handler: Any) -> web.StreamResponse:
    """Fail as a broken upstream would when the body asks for it (FAULT:<name>)."""
    if request.method != "POST":
        return await handler(request)
    raw = await request.read()
    found = _FAULT_RE.search(raw)
    if found is None or found.group(1).decode() not in FAULTS:
        return await handler(request)
    name = found.group(1).decode()
    if name == "set-cookie":
        answer = await handler(request)
        answer.set_cookie("gateway_session", "SESSION-OF-ONE-USER", path="/")
        return answer
    if name == "utf8-header":
        answer = await handler(request)
        answer.headers["X-Gateway-Note"] = UTF8_NOTE
        return answer
    transport = request.transport
    assert transport is not None
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 196\r\n\r\n"
    if name in ("short-body", "stall-body"):
        transport.write(head + b'{"model":"m","created_at":"2025-01-01T00:00:00Z","message":{"role":"as')
        if name == "stall-body":
            await asyncio.sleep(60)  # cancelled when the proxy hangs up (handler_cancellation)
        transport.close()
        raise asyncio.CancelledError  # the connection is gone: aiohttp writes nothing more
    if name == "no-answer":
        await asyncio.sleep(60)  # cancelled when the proxy hangs up (handler_cancellation)
    if name == "reset":
        transport.close()
        raise asyncio.CancelledError
    if name == "http500-json":
        return web.json_response({"error": "llama runner process has terminated: FAULT-TEXT"}, status=500)
    if name == "http500-text":
        return web.Response(status=500, text="Traceback (most recent call last):\n  panic: runtime error\n")
    if name == "http404-json":
        return web.json_response({"error": "model 'm' not found, try pulling it first"}, status=404)
    if name == "garbage":
        return web.Response(status=200, body=b"<html>not json", content_type="application/json")
    if name == "empty":
        return web.Response(status=200, body=b"", content_type="application/json")
    lie = {"Content-Encoding": "gzip"}
    return web.Response(status=200, body=b'{"model":"m","done":true}', content_type="application/json", headers=lie)


GUARD_FAMILIES = {"llama-guard": "llama-guard", "shieldgemma": "yes-no", "granite3-guardian": "yes-no"}
_UNSAFE = re.compile(r"GUARD-UNSAFE(?:-(S\d+))?")


def guard_answer(body: dict[str, Any]) -> str | None:
    """What a guard model answers to this chat, in its family's format; None for other models."""
    model = str(body.get("model", ""))
    kind = next((k for name, k in GUARD_FAMILIES.items() if model.startswith(name)), None)
    if kind is None:
        return None
    text = "\n".join(str(m.get("content", "")) for m in body.get("messages", []) if isinstance(m, dict))
    if "GUARD-MALFORMED" in text:
        return "I cannot tell; it might be fine."
    m = _UNSAFE.search(text)
    if kind == "llama-guard":
        return f"unsafe\n{m.group(1) or 'S1'}" if m else "safe"
    return "Yes" if m else "No"


def raw_lines(text: str) -> list[str] | None:
    """The lines a ``RAWLINES:`` script asks for, or None."""
    text = text.strip()
    if not text.startswith("RAWLINES:"):
        return None
    lines = orjson.loads(text[len("RAWLINES:") :])
    return [str(line) for line in lines]


def chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


class FakeOllama:
    def __init__(self, record: bool = True) -> None:
        # Every request is kept for the tests to inspect; a standalone run (benchmarks) keeps none, or the
        # growing heap makes the fake's own GC pauses show up as proxy latency.
        self.record = record
        self.requests: list[dict[str, Any]] = []
        self.app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[faults])
        r = self.app.router
        r.add_get("/", self.root)
        r.add_get("/api/version", self.version)
        r.add_get("/api/tags", self.tags)
        r.add_get("/api/ps", self.ps)
        r.add_post("/api/show", self.show)
        r.add_post("/api/chat", self.chat)
        r.add_post("/api/generate", self.generate)
        r.add_post("/api/embed", self.embed)
        r.add_post("/api/embeddings", self.embeddings)
        r.add_post("/api/pull", self.pull)
        r.add_delete("/api/delete", self.delete)
        r.add_post("/v1/chat/completions", self.oa_chat)
        r.add_post("/v1/completions", self.oa_completions)
        r.add_post("/v1/embeddings", self.oa_embeddings)
        r.add_get("/v1/models", self.oa_models)
        self.closed_early = 0  # streams whose client went away before the end
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle --
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """The request as Ollama's Go server reads it: on the generating and embedding routes, keys matched to
        its struct fields case-insensitively (last wins), unknown keys dropped (mediation.go_decode); the raw
        bytes are recorded too."""
        raw = await request.read()
        route = ROUTES.get(request.path)
        body = go_decode(raw, route) if route is not None else orjson.loads(raw)
        if self.record:
            self.requests.append({"path": request.path, "body": body, "raw": raw, "headers": dict(request.headers)})
        return body

    # -- plain endpoints --
    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running", content_type="text/plain")

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.6"})

    async def tags(self, request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps({"models": MODELS}), content_type="application/json", headers={"X-Fake": "tags"}
        )

    async def ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": []})

    async def show(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name = str(body.get("model") or body.get("name") or "")
        if name.startswith("missing"):
            return web.json_response({"error": f"model '{name}' not found"}, status=404)
        return web.json_response(
            {
                "modelfile": "FROM llama3.2",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": MODELS[0]["details"],
                "capabilities": ["completion"],
            }
        )

    async def pull(self, request: web.Request) -> web.StreamResponse:
        await self._body(request)
        return await self._ndjson(request, [{"status": "pulling manifest"}, {"status": "success"}], 0)

    async def delete(self, request: web.Request) -> web.Response:
        await self._body(request)
        return web.Response(status=200)

    # -- native generation --
    def _model_check(self, body: dict[str, Any]) -> web.Response | None:
        if body.get("model") == "missing":
            return web.json_response({"error": "model 'missing' not found"}, status=404)
        return None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if (err := self._model_check(body)) is not None:
            return err
        users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
        if (lines := raw_lines(users[-1] if users else "")) is not None:
            return await self._raw(request, lines, sse=False)
        sc = Script(users[-1] if users else "")
        answer = sc.answer
        if (verdict := guard_answer(body)) is not None:
            sc, answer = Script(""), verdict
        opts = body.get("options") or {}
        base = {"model": body["model"]}
        final_stats = {
            "done_reason": "stop",
            "total_duration": 1234567,
            "load_duration": 1000,
            "prompt_eval_count": 10,
            "prompt_eval_duration": 1000,
            "eval_count": len(answer) // 4 + 1,
            "eval_duration": 100000,
        }
        if not body.get("stream", True):
            if opts.get("fake_delay_ms"):
                await asyncio.sleep(float(opts["fake_delay_ms"]) / 1000)
            message: dict[str, Any] = {"role": "assistant", "content": answer}
            if sc.thinking:
                message["thinking"] = sc.thinking
            if sc.tools:
                message["tool_calls"] = sc.native_calls()
            return web.Response(
                body=orjson.dumps(
                    {**base, "created_at": _created_at(), "message": message, "done": True, **final_stats}
                ),
                content_type="application/json",
            )
        size = int(opts.get("fake_chunk_chars", 4))
        messages: list[dict[str, Any]] = [
            {"role": "assistant", "content": "", "thinking": c} for c in chunks(sc.thinking, size) if c
        ]
        messages += [{"role": "assistant", "content": c} for c in chunks(answer, size) if c or not messages]
        if sc.tools:
            messages.append({"role": "assistant", "content": "", "tool_calls": sc.native_calls()})
        parts = [{**base, "created_at": _created_at(), "message": m, "done": False} for m in messages]
        parts.append(
            {
                **base,
                "created_at": _created_at(),
                "message": {"role": "assistant", "content": ""},
                "done": True,
                **final_stats,
            }
        )
        return await self._ndjson(request, parts, float(opts.get("fake_delay_ms", 0)), opts.get("fake_stall_after"))

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if (err := self._model_check(body)) is not None:
            return err
        if (lines := raw_lines(body.get("prompt", ""))) is not None:
            return await self._raw(request, lines, sse=False)
        sc = Script(body.get("prompt", ""))
        answer = sc.answer
        opts = body.get("options") or {}
        base = {"model": body["model"]}
        # options.fake_context_tokens: a final chunk carrying that many context tokens (a very long last line)
        context = list(range(int(opts.get("fake_context_tokens", 3))))
        final = {"done_reason": "stop", "context": context, "total_duration": 1234567, "eval_count": 5}
        thought = {"thinking": sc.thinking} if sc.thinking else {}
        if not body.get("stream", True):
            return web.Response(
                body=orjson.dumps(
                    {**base, "created_at": _created_at(), "response": answer, **thought, "done": True, **final}
                ),
                content_type="application/json",
            )
        size = int(opts.get("fake_chunk_chars", 4))
        parts = [
            {**base, "created_at": _created_at(), "response": "", "thinking": c, "done": False}
            for c in chunks(sc.thinking, size)
            if c
        ]
        parts += [
            {**base, "created_at": _created_at(), "response": c, "done": False}
            for c in chunks(answer, size)
            if c or not parts
        ]
        if opts.get("fake_line_bytes"):  # options.fake_line_bytes: one chunk whose line is that long
            parts.append({**base, "response": "x" * int(opts["fake_line_bytes"]), "done": False})
        parts.append({**base, "created_at": _created_at(), "response": "", "done": True, **final})
        return await self._ndjson(request, parts, float(opts.get("fake_delay_ms", 0)), opts.get("fake_stall_after"))

    async def _raw(self, request: web.Request, lines: list[str], sse: bool) -> web.StreamResponse:
        frames = [(f"data: {line}\n\n" if sse else f"{line}\n").encode() for line in lines]
        return await self._stream(request, "text/event-stream" if sse else "application/x-ndjson", frames)

    async def _ndjson(
        self, request: web.Request, parts: list[dict[str, Any]], delay_ms: float, stall_after: int | None = None
    ) -> web.StreamResponse:
        frames = [orjson.dumps(p) + b"\n" for p in parts]
        return await self._stream(request, "application/x-ndjson", frames, delay_ms, stall_after)

    async def _stream(
        self,
        request: web.Request,
        content_type: str,
        frames: list[bytes],
        delay_ms: float = 0,
        stall_after: int | None = None,
    ) -> web.StreamResponse:
        """`frames` streamed, `delay_ms` apart; with `stall_after`, nothing more after that many frames for 60 s,
        as a model runner that hangs mid-answer (a stuck GPU) keeps the connection open and silent."""
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        await resp.prepare(request)
        try:
            for i, frame in enumerate(frames):
                if i == stall_after:
                    await asyncio.sleep(60)  # cancelled when the proxy hangs up (handler_cancellation)
                await resp.write(frame)
                if delay_ms:
                    await asyncio.sleep(delay_ms / 1000)
        except ConnectionResetError:  # the proxy closed the stream (its client left, or the guard stopped it)
            self.closed_early += 1
            return resp
        except asyncio.CancelledError:
            self.closed_early += 1
            raise
        await resp.write_eof()
        return resp

    async def embed(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        inputs = body.get("input")
        n = 1 if isinstance(inputs, str) else len(inputs or [])
        return web.json_response(
            {
                "model": body["model"],
                "embeddings": [[0.1, 0.2, 0.3]] * n,
                "total_duration": 1000,
                "prompt_eval_count": n,
            }
        )

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        return web.json_response({"embedding": [0.1, 0.2, 0.3], "model": body.get("model")})

    # -- OpenAI compatible --
    async def oa_chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        users = []
        for m in body.get("messages", []):
            if m.get("role") != "user":
                continue
            c = m.get("content")
            users.append(c if isinstance(c, str) else " ".join(p.get("text", "") for p in c if p.get("type") == "text"))
        if (lines := raw_lines(users[-1] if users else "")) is not None:
            return await self._raw(request, lines, sse=True)
        sc = Script(users[-1] if users else "")
        answer = sc.answer
        now = int(time.time())
        base = {
            "id": "chatcmpl-123",
            "created": now,
            "model": body["model"],
            "system_fingerprint": "fp_ollama",
        }
        finish = "tool_calls" if sc.tools else "stop"
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": answer}
            if sc.thinking:
                message["reasoning"] = sc.thinking
            if sc.tools:
                message["tool_calls"] = sc.openai_calls(stream=False)
            return web.Response(
                body=orjson.dumps(
                    {
                        **base,
                        "object": "chat.completion",
                        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                    }
                ),
                content_type="application/json",
            )
        # The /v1 API has no `options`: the chunk size rides in OpenAI's free-form `metadata`, which Ollama
        # ignores and the guard forwards.
        opts = body.get("metadata") or {}
        size = int(opts.get("fake_chunk_chars", 4))
        deltas: list[dict[str, Any]] = [
            {"role": "assistant", "content": "", "reasoning": c} for c in chunks(sc.thinking, size) if c
        ]
        deltas += [{"role": "assistant", "content": c} for c in chunks(answer, size) if c or not deltas]
        if sc.tools:
            deltas.append({"role": "assistant", "content": "", "tool_calls": sc.openai_calls(stream=True)})
        events = [
            {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": d, "finish_reason": None}],
            }
            for d in deltas
        ]
        events.append(
            {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": finish}],
            }
        )
        if (body.get("stream_options") or {}).get("include_usage"):  # as Ollama: a last chunk, no choices
            usage = {"prompt_tokens": 10, "completion_tokens": len(answer) // 4 + 1}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            events.append({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        return await self._sse(request, events)

    async def oa_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prompt = body.get("prompt")
        if (lines := raw_lines(prompt if isinstance(prompt, str) else "")) is not None:
            return await self._raw(request, lines, sse=True)
        answer = script_answer(prompt if isinstance(prompt, str) else (prompt or [""])[0])
        base = {
            "id": "cmpl-123",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "fp_ollama",
        }
        if not body.get("stream"):
            return web.Response(
                body=orjson.dumps(
                    {
                        **base,
                        "object": "text_completion",
                        "choices": [{"index": 0, "text": answer, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                    }
                ),
                content_type="application/json",
            )
        events = [
            {**base, "object": "text_completion", "choices": [{"index": 0, "text": c, "finish_reason": None}]}
            for c in chunks(answer, 4)
        ]
        events.append(
            {
                **base,
                "object": "text_completion",
                "choices": [{"index": 0, "text": "", "finish_reason": "stop"}],
            }
        )
        return await self._sse(request, events)

    async def _sse(self, request: web.Request, events: list[dict[str, Any]]) -> web.StreamResponse:
        frames = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
        return await self._stream(request, "text/event-stream", frames)

    async def oa_embeddings(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        inputs = body.get("input")
        n = 1 if isinstance(inputs, str) else len(inputs or [])
        return web.json_response(
            {
                "object": "list",
                "model": body["model"],
                "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2]} for i in range(n)],
                "usage": {"prompt_tokens": 3, "total_tokens": 3},
            }
        )

    async def oa_models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": "llama3.2:latest", "object": "model", "created": 1735689600, "owned_by": "library"}],
            }
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=11434)
    args = ap.parse_args(argv)
    fake = FakeOllama(record=False)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(fake.app, host=args.host, port=args.port, access_log=None, print=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
