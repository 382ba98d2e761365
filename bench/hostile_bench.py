"""One hostile request among normal traffic: the normal requests' latency with and without it.

    .venv/bin/python bench/hostile_bench.py [--duration 10] [--hostile-kb 570]

Starts the fake Ollama and the proxy (`ollama-guard serve`, one worker, the default pure scanners, verdict
cache off so every normal request is scanned). Normal traffic: 4 closed-loop clients sending unique
~300-character /api/chat prompts. Hostile traffic: one client sending, again and again, a request of six
95 KB messages of short `k=<random>` lines (every line matches detect-secrets' base64 expression; the
report's input). Prints the normal requests' p50/p99 alone and beside the hostile client, and what the hostile
requests got (status, seconds). To measure older code, run it with PYTHONPATH pointing at that tree's `proxy/`.
Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy_bench import free_port, wait_http  # noqa: E402

PY = sys.executable


def hostile_body(kb: int) -> dict:
    rng = random.Random(1)
    per_message = min(95_000, kb * 1024 // 6)

    def text() -> str:
        lines, n = [], 0
        while n < per_message:
            line = "k=" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(10))
            lines.append(line)
            n += len(line) + 1
        return "\n".join(lines)[:per_message]

    return {"model": "m", "stream": False, "messages": [{"role": "user", "content": text()} for _ in range(6)]}


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else float("nan")


async def normal_client(client: httpx.AsyncClient, url: str, stop: float, out: list[float], cid: int) -> None:
    n = 0
    nonce = random.randrange(1 << 30)
    while time.monotonic() < stop:
        n += 1
        prompt = f"N{nonce}-{cid}-{n} " + "how do I roll back a deployment after a bad image " * 6
        body = {"model": "m", "stream": False, "messages": [{"role": "user", "content": prompt[:300]}]}
        t0 = time.perf_counter()
        r = await client.post(url + "/api/chat", json=body)
        out.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()


async def hostile_client(client: httpx.AsyncClient, url: str, stop: float, body: dict, out: list) -> None:
    while time.monotonic() < stop:
        t0 = time.perf_counter()
        r = await client.post(url + "/api/chat", json=body)
        out.append((r.status_code, time.perf_counter() - t0))


async def run(url: str, duration: float, body: dict | None) -> tuple[list[float], list]:
    lat: list[float] = []
    hostile: list = []
    stop = time.monotonic() + duration
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=16)) as client:
        tasks = [normal_client(client, url, stop, lat, i) for i in range(4)]
        if body is not None:
            tasks.append(hostile_client(client, url, stop, body, hostile))
        await asyncio.gather(*tasks)
    return lat, hostile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--hostile-kb", type=int, default=570)
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="og-hostile-"))
    cfg = tmp / "config.yaml"
    cfg.write_text("cache:\n  enabled: false\nlogging:\n  audit: false\n")
    up, px = free_port(), free_port()
    procs = [subprocess.Popen([PY, "-m", "ollama_guard.testing.fake_ollama", "--port", str(up)], env=env)]
    try:
        procs.append(
            subprocess.Popen(
                [
                    PY,
                    "-m",
                    "ollama_guard.cli",
                    "-c",
                    str(cfg),
                    "serve",
                    "--port",
                    str(px),
                    "--ollama-url",
                    f"http://127.0.0.1:{up}",
                ],
                env=env,
            )
        )
        url = f"http://127.0.0.1:{px}"
        wait_http(f"http://127.0.0.1:{up}/")
        wait_http(url + "/ready")
        body = hostile_body(args.hostile_kb)
        asyncio.run(run(url, 2, None))  # warm-up
        alone, _ = asyncio.run(run(url, args.duration, None))
        beside, hostile = asyncio.run(run(url, args.duration, body))
        print(f"normal requests (4 clients, unique ~300-char prompts), {args.duration:g} s each")
        print(f"  alone:                 n={len(alone):5d}  p50 {pct(alone, 50):7.1f} ms  p99 {pct(alone, 99):7.1f} ms")
        print(
            f"  beside hostile client: n={len(beside):5d}  p50 {pct(beside, 50):7.1f} ms  p99 {pct(beside, 99):7.1f} ms"
        )
        statuses = sorted({s for s, _ in hostile})
        secs = [t for _, t in hostile]
        print(
            f"hostile requests ({args.hostile_kb} KB, 6 messages): n={len(hostile)} status {statuses} "
            f"each {min(secs, default=0):.2f}-{max(secs, default=0):.2f} s"
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


if __name__ == "__main__":
    main()
