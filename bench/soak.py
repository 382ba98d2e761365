"""Soak: many concurrent guarded streams, a third of the clients walking away mid-stream, for a bounded time.
Half the streams come from a "reasoning model": thinking first, then the answer, some ending in a tool call.

Prints requests done, failures (5xx or broken framing), the proxy's RSS and open sockets before and after,
and how many upstream streams were cut short. Never asserts; a leak shows as growing RSS or sockets.

    .venv/bin/python bench/soak.py [--seconds 30] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
from typing import Any

import httpx
import psutil

sys.path.insert(0, os.path.dirname(__file__))
from proxy_bench import free_port, wait_http  # noqa: E402

PY = sys.executable


async def client(url: str, stop_at: float, stats: dict[str, int], rng: random.Random) -> None:
    async with httpx.AsyncClient(timeout=60) as c:
        while time.monotonic() < stop_at:
            words = rng.randint(20, 400)
            content = f"REPEAT {words}: word{rng.random()} "
            if rng.random() < 0.5:  # a reasoning model: thoughts first, a tool call at the end now and then
                thoughts = " ".join(f"step{i}" for i in range(rng.randint(10, 150)))
                tool = ' || TOOL: lookup {"q": "x"}' if rng.random() < 0.3 else ""
                content = f"THINK: {thoughts} || {content}{tool}"
            body = {
                "model": "m",
                "messages": [{"role": "user", "content": content}],
                "options": {"fake_chunk_chars": rng.choice([1, 4, 16]), "fake_delay_ms": rng.choice([0, 0, 1])},
            }
            leave_early = rng.random() < 0.33
            try:
                async with c.stream("POST", url + "/api/chat", json=body) as r:
                    if r.status_code >= 500:
                        stats["failed"] += 1
                        continue
                    lines = 0
                    async for _ in r.aiter_lines():
                        lines += 1
                        if leave_early and lines == 3:
                            break
                    stats["left"] += leave_early
                    stats["done"] += 1
            except httpx.HTTPError:
                stats["failed"] += 1


def sockets(pid: int, upstream_port: int) -> tuple[int, int]:
    """(connections to Ollama, all other TCP sockets) of the proxy."""
    conns = psutil.Process(pid).net_connections(kind="tcp")
    up = sum(1 for c in conns if c.raddr and c.raddr.port == upstream_port)
    return up, len(conns) - up


async def soak(url: str, args: argparse.Namespace, sample: Any) -> tuple[dict[str, int], list[Any]]:
    stats = {"done": 0, "failed": 0, "left": 0}
    rng = random.Random(1)
    rounds = []
    for _ in range(args.rounds):
        stop_at = time.monotonic() + args.seconds
        await asyncio.gather(
            *(client(url, stop_at, stats, random.Random(rng.random())) for _ in range(args.concurrency))
        )
        await asyncio.sleep(2)  # let closed connections settle before counting (measurement, not sync)
        rounds.append(sample())
    return stats, rounds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    up_port, px_port = free_port(), free_port()
    env = {**os.environ, "OLLAMA_GUARD_LOGGING__AUDIT": "false"}
    procs = [subprocess.Popen([PY, "-m", "ollama_guard.testing.fake_ollama", "--port", str(up_port)])]
    serve = [
        PY,
        "-m",
        "ollama_guard.cli",
        "serve",
        "--port",
        str(px_port),
        "--ollama-url",
        f"http://127.0.0.1:{up_port}",
    ]
    procs.append(subprocess.Popen(serve, env=env, stderr=subprocess.DEVNULL))
    try:
        url = f"http://127.0.0.1:{px_port}"
        wait_http(url + "/ready")
        proxy = psutil.Process(procs[1].pid)

        def sample() -> tuple[float, tuple[int, int]]:
            return proxy.memory_info().rss / 1e6, sockets(proxy.pid, up_port)

        before = sample()
        stats, rounds = asyncio.run(soak(url, args, sample))
        in_flight = [
            line
            for line in httpx.get(url + "/metrics").text.splitlines()
            if line.startswith("ollama_guard_requests_in_flight ")
        ]
        print(
            f"soak {args.rounds} x {args.seconds}s at c={args.concurrency}: {stats['done']} streams "
            f"({stats['left']} clients left mid-stream), {stats['failed']} failed"
        )
        print(f"before: RSS {before[0]:.0f} MB, sockets to Ollama {before[1][0]}, other sockets {before[1][1]}")
        for i, (rss, (up, other)) in enumerate(rounds, 1):
            print(f"after round {i}: RSS {rss:.0f} MB, sockets to Ollama {up} (pooled), other sockets {other}")
        print(in_flight[0] if in_flight else "")
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


if __name__ == "__main__":
    main()
