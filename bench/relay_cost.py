"""The streamed answer's per-chunk path measured alone: the relay (parse, guard bookkeeping, scans, release,
rebuild) over an in-memory upstream, no network, no server.

    .venv/bin/python bench/relay_cost.py [--chars 16000] [--repeat 20]

Prints CPU milliseconds per 1,000 streamed characters and microseconds per upstream chunk (4 characters each,
like the fake Ollama's default) for Ollama NDJSON and OpenAI SSE, with the chunks arriving:
- together: the whole answer in 64 KiB reads, as from a fast model or a local upstream;
- one per read: as from a model paced at a few tens of tokens per second.
The "parse only" row is the floor any relay that reads every event pays: split the reads into lines and
`orjson.loads` each. The policy is bench/proxy_bench.py's default-style one (Secrets on the output).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
from typing import Any

import orjson
from ollama_guard.dialects import ROUTES
from ollama_guard.relay import GuardedStream
from ollama_guard.scanning.engine import ScanEngine
from ollama_guard.scanning.policy import build_policy
from ollama_guard.scanning.stream import StreamGuard
from ollama_guard.settings import load_settings

UNIT = "lorem ipsum dolor sit amet, consectetur. "
READ = 65536


def ndjson(text: str) -> list[bytes]:
    base = {"model": "llama3.2", "created_at": "2026-11-30T21:09:42.078671216Z"}
    lines = [
        orjson.dumps({**base, "message": {"role": "assistant", "content": text[i : i + 4]}, "done": False}) + b"\n"
        for i in range(0, len(text), 4)
    ]
    end = {**base, "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop"}
    return [*lines, orjson.dumps(end) + b"\n"]


def sse(text: str) -> list[bytes]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1764536982, "model": "llama3.2"}

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n"

    events = [event({"role": "assistant", "content": text[i : i + 4]}) for i in range(0, len(text), 4)]
    return [*events, event({}, "stop"), b"data: [DONE]\n\n"]


class Upstream:
    """What the relay reads of an aiohttp response: `content.readany()` (b"" at the end), `connection` (None: no
    socket whose timer to turn off), `release()`, `close()`."""

    def __init__(self, reads: list[bytes]) -> None:
        self.reads = iter(reads)
        self.content = self
        self.connection = None

    async def readany(self) -> bytes:
        return next(self.reads, b"")

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


async def relay(engine: ScanEngine, path: str, reads: list[bytes]) -> int:
    s = engine.settings
    stream = GuardedStream(
        Upstream(reads), ROUTES[path], lambda side: StreamGuard(engine, s, prompt="p", side=side), "llama3.2", None
    )
    return sum([len(b) async for b in stream.__aiter__()])


async def parse_only(reads: list[bytes]) -> int:
    n = 0
    for line in b"".join(reads).split(b"\n"):
        if line.startswith(b"data: "):
            line = line[6:]
        if line.strip() and line != b"[DONE]":
            n += len(orjson.loads(line))
    return n


def cpu_per(work: Any, repeat: int, chars: int, chunks: int) -> tuple[float, float]:
    """(ms per 1,000 characters, us per chunk): the fastest of five rounds of `repeat` runs."""
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(repeat):
            asyncio.run(work())
        best = min(best, time.process_time() - started)
    return best * 1000 / (chars * repeat / 1000), best * 1e6 / (chunks * repeat)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chars", type=int, default=16_000)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    settings = load_settings(
        overrides={
            "input_scanners": [{"type": "InvisibleText"}, {"type": "Secrets", "action": "sanitize"}],
            "output_scanners": [{"type": "Secrets", "action": "sanitize"}],
            "logging": {"audit": False},
        },
        environ={},
    )
    engine = ScanEngine(build_policy(settings), settings)
    text = (UNIT * (args.chars // len(UNIT) + 1))[: args.chars]
    print(f"relay alone, {args.chars} characters in 4-character chunks, fastest of 5 x {args.repeat} streams")
    print(f"{'':30s} {'ms / 1,000 chars':>17s} {'us / chunk':>11s}")
    for path, frame in (("/api/chat", ndjson), ("/v1/chat/completions", sse)):
        events = frame(text)
        blob = b"".join(events)
        together = [blob[i : i + READ] for i in range(0, len(blob), READ)]
        for name, reads in (("together", together), ("one per read", events)):
            ms, us = cpu_per(functools.partial(relay, engine, path, reads), args.repeat, args.chars, len(events))
            print(f"{path:21s} {name:12s} {ms:13.3f} {us:14.2f}")
        ms, us = cpu_per(functools.partial(parse_only, together), args.repeat, args.chars, len(events))
        print(f"{path:21s} {'parse only':12s} {ms:13.3f} {us:14.2f}")
    engine.close()


if __name__ == "__main__":
    main()
