"""Proxy memory at a full verdict cache: idle RSS, then RSS after enough unique prompts to fill the cache.

Starts the fake Ollama and the proxy (`ollama-guard serve`, memory cache of `--entries` verdicts, the
default-style policy), sends unique prompts with unique answers (two verdicts a request: the prompt and the
answer) until the cache is full, and prints RSS and the memory per cached verdict. Never asserts.

    .venv/bin/python bench/cache_memory.py [--entries 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy_bench import POLICY, free_port, wait_http  # noqa: E402

PY = sys.executable


async def fill(url: str, requests: int, concurrency: int = 16) -> None:
    nonce = os.urandom(4).hex()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            text = f"REPLY: cache fill {nonce} {i} " + "lorem ipsum dolor sit amet " * 8
            body = {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": text}]}
            r = await client.post(url + "/api/chat", json=body)
            r.raise_for_status()

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=10_000, help="cache.max_size (the default is 10,000)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="og-cache-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    up, px = free_port(), free_port()
    procs = [subprocess.Popen([PY, "-m", "ollama_guard.testing.fake_ollama", "--port", str(up)], env=env)]
    cfg = tmp / "config.yaml"
    cfg.write_text(
        yaml.safe_dump(dict(POLICY, logging={"audit": False}, cache={"backend": "memory", "max_size": args.entries}))
    )
    procs.append(
        subprocess.Popen(
            [
                PY,
                "-m",
                "ollama_guard.cli",
                "serve",
                "-c",
                str(cfg),
                "--port",
                str(px),
                "--ollama-url",
                f"http://127.0.0.1:{up}",
            ],
            env=env,
        )
    )
    try:
        proxy = f"http://127.0.0.1:{px}"
        wait_http(f"http://127.0.0.1:{up}/")
        wait_http(proxy + "/ready")
        time.sleep(1.0)
        proc = psutil.Process(procs[-1].pid)
        idle = proc.memory_info().rss
        started = time.monotonic()
        asyncio.run(fill(proxy, args.entries // 2 + 100))  # two verdicts a request
        size = httpx.get(proxy + "/stats").json()["cache"].get("memory_size")
        full = proc.memory_info().rss
        print(f"\ncache memory (memory backend, max_size {args.entries}, default-style policy)")
        print(
            f"idle RSS {idle / 1e6:.0f} MB; after {args.entries // 2 + 100} unique requests "
            f"({time.monotonic() - started:.0f} s) RSS {full / 1e6:.0f} MB, cache size {size}"
        )
        print(
            f"RSS per cached verdict {(full - idle) / max(size or args.entries, 1):.0f} bytes "
            f"(includes the heap the requests themselves grew)"
        )
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(10)


if __name__ == "__main__":
    main()
