"""Instructions per request, counted by callgrind: the request path measured by what it executes, not by how
long it took, so the figure is the same on a quiet and on a loaded machine (this bench's timings on the 2-core
machines here move by 10-20 % between runs of the same code; these counts by under 1 %).

    .venv/bin/python bench/request_instructions.py [--requests 500]

Drives an ASGI app in-process, one request at a time, under `valgrind --tool=callgrind` (valgrind: Debian's
package of that name): no server, and no network but to a fake Ollama on loopback, which runs outside valgrind.
Each row runs three times: with 200 warm-up requests, with 200 + `--requests` and with 200 + 2 x `--requests`.
The count grows by one request's instructions per request, start-up and warm-up cancelling out; the two
increments should agree, and a row whose increments differ by more than 2 % says so (a one-time event in one
run, such as a collection of the oldest GC generation, skews it: run again). Rows:
- the minimal pass-through's app (bench/passthrough.py), the reference;
- the proxy, cache hit: the same non-streaming /api/chat body every time;
- the proxy, unique ~300-character prompts (the fake Ollama answers with the prompt's text, so the answer is
  new too): both are scanned, and both verdicts stored;
- a short stream (32 characters in 4-character chunks 2 ms apart, each in a read of its own; a cached prompt)
  through the pass-through and the proxy: a stream's set-up and its per-chunk work;
- the first chunk's path: a stream of three chunks sent at once, whose third ends the first word: the proxy
  releases its text there, as in proxy_bench.py's time-to-first-chunk cell (`--kinds` picks rows).
The policy is bench/proxy_bench.py's default-style one. Uvicorn's own work per request, the same for both
apps, is not in these figures, so their ratio is lower than proxy_bench.py's requests/s ratio. Never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from proxy_bench import POLICY, ROOT, SAME_BODY, free_port, wait_http

WARM_UP = 200
KINDS = ["passthrough", "hit", "unique", "passthrough-stream", "stream", "passthrough-first", "first"]
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()


# A short stream: the fake Ollama answers "streamed words. " twice, in 4-character chunks (8 and the last), 2 ms
# apart, so that each arrives in a read of its own, as a model's tokens do (and the count does not depend on
# how many happened to arrive together).
STREAM_BODY = (
    b'{"model":"llama3.2","options":{"fake_delay_ms":2},'
    b'"messages":[{"role":"user","content":"REPEAT 2: streamed words. "}]}'
)

# The first chunk's path: "streamed wor" in three 4-character chunks sent at once, the answer's whole text (a
# cached prompt). The proxy releases its first text once a word has ended, here at the third chunk, as in
# proxy_bench.py's time-to-first-chunk cell; the pass-through sends each chunk as it arrives.
FIRST_BODY = b'{"model":"llama3.2","messages":[{"role":"user","content":"REPEAT 1: streamed wor"}]}'


def body(kind: str, i: int) -> bytes:
    """The request body of request `i`: the same one (hit), a short stream, or a fresh prompt ("REPLY:" makes the
    fake Ollama answer with it)."""
    if kind.endswith("stream"):
        return STREAM_BODY
    if kind.endswith("first"):
        return FIRST_BODY
    if kind != "unique":
        return SAME_BODY.encode()
    prompt = (f"REPLY: NONCE-{i} " + " ".join(WORDS[(i + k * 7) % 12] for k in range(45)))[:300]
    return b'{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"' + prompt.encode() + b'"}]}'


async def request(app: Any, raw: bytes) -> None:
    """One POST /api/chat through the ASGI app; raises unless it answered 200."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/chat",
        "raw_path": b"/api/chat",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()  # the client never leaves
        raise AssertionError

    status: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    if status != [200]:
        raise RuntimeError(f"answered {status}")


async def drive(kind: str, count: int, upstream: str) -> None:
    """`count` requests of `kind` (passthrough, passthrough-stream, hit, unique, stream), one at a time, after the
    app's start-up."""
    if kind.startswith("passthrough"):
        os.environ["UPSTREAM"] = upstream
        sys.path.insert(0, str(ROOT / "bench"))
        import passthrough

        app: Any = passthrough.app
        started: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await inbox.put({"type": "lifespan.startup"})
        lifespan = asyncio.create_task(app({"type": "lifespan"}, inbox.get, started.put))
        await started.get()
        for i in range(count):
            await request(app, body(kind, i))
        await inbox.put({"type": "lifespan.shutdown"})
        await lifespan
        return
    from ollama_guard.app import create_app
    from ollama_guard.settings import load_settings

    settings = load_settings(
        overrides=dict(
            POLICY, ollama_url=upstream, logging={"audit": False}, cache={"backend": "memory", "max_size": 100000}
        ),
        environ={},
    )
    guard = create_app(settings)
    async with guard.router.lifespan_context(guard):
        for i in range(count):
            await request(guard, body(kind, i))


def instructions(kind: str, count: int, upstream: str) -> int:
    """The instructions callgrind counted for a whole run of `drive(kind, count)`."""
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--drive",
            kind,
            "--count",
            str(count),
            "--upstream",
            upstream,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no count from callgrind: {out.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=500, help="requests per step, after 200 of warm-up")
    ap.add_argument("--kinds", default=",".join(KINDS), help="rows to count, comma-separated: " + ", ".join(KINDS))
    ap.add_argument("--drive", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--upstream", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.drive:
        import uvloop

        uvloop.run(drive(args.drive, args.count, args.upstream))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed: apt-get install valgrind")
    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    fake = subprocess.Popen(
        [sys.executable, "-m", "ollama_guard.testing.fake_ollama", "--port", str(port)], stdout=subprocess.DEVNULL
    )
    try:
        wait_http(upstream + "/", timeout=60)
        kinds = [k for k in KINDS if k in args.kinds.split(",")]
        steps = (WARM_UP, WARM_UP + args.requests, WARM_UP + 2 * args.requests)
        runs = [(k, n) for k in kinds for n in steps]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            counted = dict(zip(runs, pool.map(lambda run: instructions(run[0], run[1], upstream), runs), strict=True))
        per, spread = {}, {}
        for k in kinds:
            first, second = (
                (counted[(k, b)] - counted[(k, a)]) / args.requests for a, b in zip(steps, steps[1:], strict=False)
            )
            per[k] = (first + second) / 2
            spread[k] = abs(first - second) / per[k]
        print(f"instructions per request (callgrind, in-process, one at a time, 2 x {args.requests} requests)")
        names = {
            "passthrough": "minimal pass-through's app",
            "hit": "proxy, cache hit",
            "unique": "proxy, unique prompts",
            "passthrough-stream": "pass-through, short stream",
            "stream": "proxy, short stream",
            "passthrough-first": "pass-through, first chunk",
            "first": "proxy, first chunk",
        }
        for k in kinds:
            ref = per.get("passthrough-" + k.rpartition("-")[2] if k.endswith(("stream", "first")) else "passthrough")
            ratio = f"   {per[k] / ref:.2f}x the pass-through's" if ref else ""
            warn = f"   (increments differ by {spread[k]:.0%}: run again)" if spread[k] > 0.02 else ""
            print(f"{names[k]:28s} {per[k] / 1000:9.0f}k{ratio}{warn}")
    finally:
        fake.terminate()
        fake.wait()


if __name__ == "__main__":
    main()
