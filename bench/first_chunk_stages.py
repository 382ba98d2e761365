"""Where a streamed answer's first chunk waits: stage by stage, inside the server, for the pass-through and the proxy.

    .venv/bin/python bench/first_chunk_stages.py [--streams 400]

Starts the fake Ollama and two servers under uvicorn (uvloop, httptools), each with timestamps taken at the
edges of its stages (this script, run with `--serve`, wraps the app's ASGI `send`, aiohttp's request and the
proxy's stage functions by name; nothing in the proxy is changed), then sends `--streams` streamed /api/chat
requests to each in turn, as proxy_bench.py's time-to-first-chunk cell does, and prints each stage's median
in microseconds: from the request's arrival to the upstream request, Ollama's answer to its headers, then to
the first body bytes handed to the server. For the proxy also how many network reads of Ollama's body came
before the first chunk: the guard releases text once its first word has ended (the Secrets scanner holds the
running word back), so a first chunk may wait for a second or third read that the pass-through, which sends
what arrives, never waits for. A stage the code no longer has (a renamed function) is left out of the table.
Never asserts.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from proxy_bench import PY, _first_chunk_ms, free_port, served_app, start_served, stop_served, wait_http  # noqa: E402

# The proxy's stages, in order: (module, attribute, label). Each label gets a "<" (first entry) and a ">"
# (first return) timestamp.
PROXY_STAGES = [
    ("ollama_guard.pipeline", "read_body", "body read"),
    ("ollama_guard.requests:Validator", "parse", "request parsed"),
    ("ollama_guard.scanning.engine:ScanEngine", "scan_many", "prompt's verdict"),
    ("ollama_guard.relay:GuardedStream", "__init__", "stream guard set up"),
    ("ollama_guard.scanning.engine:ScanEngine", "scan_window", "first scan of the answer"),
]


def _serve(kind: str, port: int) -> None:
    """Runs one instrumented server until SIGTERM, then prints its stage medians to stdout."""
    import importlib
    import inspect

    import aiohttp
    import uvicorn

    clock = time.perf_counter_ns
    records: list[dict[str, Any]] = []
    now: dict[str, Any] = {}

    def stamp(owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)
        if inspect.iscoroutinefunction(inner):

            async def wrapped_async(*a: Any, **k: Any) -> Any:
                now.setdefault(label + "<", clock())
                result = await inner(*a, **k)
                now.setdefault(label + ">", clock())
                return result

            setattr(owner, name, wrapped_async)
        else:

            def wrapped(*a: Any, **k: Any) -> Any:
                now.setdefault(label + "<", clock())
                result = inner(*a, **k)
                now.setdefault(label + ">", clock())
                return result

            setattr(owner, name, wrapped)

    stamp(aiohttp.ClientSession, "_request", "Ollama's headers wait")  # aiohttp's request: sent, then its headers
    readany = aiohttp.StreamReader.readany

    async def counted_readany(self: Any) -> bytes:
        if "first" not in now:
            now["reads"] = now.get("reads", 0) + 1
        return await readany(self)

    aiohttp.StreamReader.readany = counted_readany  # type: ignore[method-assign]
    if kind == "proxy":
        for where, name, label in PROXY_STAGES:
            module, _, cls = where.partition(":")
            try:
                owner: Any = importlib.import_module(module)
                if cls:
                    owner = getattr(owner, cls)
                stamp(owner, name, label)
            except (ImportError, AttributeError):
                print(f"(no {where}.{name}: its stage is left out)", file=sys.stderr)
    app = served_app(kind)

    async def timed(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/api/chat":
            return await app(scope, receive, send)
        now.clear()
        now["in"] = clock()

        async def timed_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                now["start"] = clock()
            elif message.get("body") and "first" not in now:
                now["first"] = clock()
            await send(message)

        await app(scope, receive, timed_send)
        records.append(dict(now))

    def report(*_: Any) -> None:
        print(summary(records[50:]), flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, report)
    uvicorn.run(timed, port=port, loop="uvloop", http="httptools", log_level="warning", access_log=False)


def summary(records: list[dict[str, Any]]) -> str:
    """Each stage's median (us), in the order the stamps came, from the request's arrival."""
    if not records:
        return "no requests"
    order = sorted((k for k in records[0] if k not in ("in", "reads")), key=lambda k: records[0][k])
    names = {"in": "arrival", "start": "response start", "first": "first chunk"}

    def name(key: str) -> str:
        return names.get(key) or key[:-1] + (" begins" if key.endswith("<") else " done")

    lines, before = [], "in"
    for key in order:
        gaps = [(r[key] - r[before]) / 1000 for r in records if key in r and before in r]
        if gaps:
            lines.append(f"  {name(before):>32} -> {name(key):<32} {statistics.median(gaps):7.0f} us")
        before = key
    total = sorted((r["first"] - r["in"]) / 1000 for r in records if "first" in r)
    lines.append(
        f"  {'arrival -> first chunk':>69} {statistics.median(total):7.0f} us (p25 {total[len(total) // 4]:.0f})"
    )
    reads = collections.Counter(r.get("reads", 0) for r in records)
    waits = {
        n: statistics.median([(r["first"] - r["in"]) / 1000 for r in records if r.get("reads", 0) == n]) for n in reads
    }
    lines.append(
        "  reads of Ollama's body before the first chunk: "
        + ", ".join(f"{n}: {c} streams (first chunk at {waits[n]:.0f} us)" for n, c in sorted(reads.items()))
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=400)
    ap.add_argument("--serve", choices=["pt", "proxy"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        _serve(args.serve, args.port)
        return
    import httpx

    up, ports = free_port(), {"pass-through": free_port(), "proxy": free_port()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UPSTREAM": f"http://127.0.0.1:{up}"}
    fake = subprocess.Popen([PY, "-m", "ollama_guard.testing.fake_ollama", "--port", str(up)], env=env)
    servers = start_served(__file__, ports, env)
    try:
        wait_http(f"http://127.0.0.1:{up}/")
        for port in ports.values():
            wait_http(f"http://127.0.0.1:{port}/api/tags")
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        clients = {name: httpx.Client() for name in urls}
        for _ in range(args.streams + 50):
            for name, url in urls.items():
                _first_chunk_ms(clients[name], url)
    finally:
        outputs = stop_served(servers)
        fake.terminate()
        fake.wait(10)
    for name, out in outputs.items():
        print(f"{name} (median of {args.streams} streams, in the server):\n{out.rstrip()}")


if __name__ == "__main__":
    main()
