"""The garbage collector's work per request, inside each server under uvicorn: the pass-through and the proxy.

    .venv/bin/python bench/gc_collections.py [--requests 2000]

CPython frees an object when its last reference goes, except objects in a reference cycle: those wait for the
cycle collector, which runs once the tracked objects allocated outnumber those freed by 700 (generation 0),
and then walks every young object; every tenth such pass walks generation 1 as well. A request path that
leaves cycles behind makes these passes happen, each one on whichever request is running then. This script
starts the fake Ollama and each server under uvicorn (uvloop, httptools) with `gc.callbacks` counting the
collections of each generation and the time they took, sends each server `--requests` streamed /api/chat
requests (proxy_bench.py's time-to-first-chunk body, read whole) and then as many cache hits, after a
warm-up whose collections are not counted, and prints the counts and the milliseconds per 1,000 requests.
Never asserts.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from proxy_bench import (  # noqa: E402
    PY,
    SAME_BODY,
    _first_chunk_ms,
    free_port,
    served_app,
    start_served,
    stop_served,
    wait_http,
)

WARM_UP = 100


def _serve(kind: str, port: int) -> None:
    """Runs one server until SIGTERM, counting collections from SIGUSR1 on; prints them to stdout on SIGTERM."""
    import uvicorn

    counts, spent, began = [0, 0, 0], [0.0], [0.0]

    def observe(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            counts[info["generation"]] += 1
            spent[0] += time.perf_counter() - began[0]

    def reset(*_: Any) -> None:
        counts[:] = [0, 0, 0]
        spent[0] = 0.0

    def report(*_: Any) -> None:
        print(f"{counts[0]} {counts[1]} {counts[2]} {spent[0] * 1000:.3f}", flush=True)
        os._exit(0)

    gc.callbacks.append(observe)
    signal.signal(signal.SIGUSR1, reset)
    signal.signal(signal.SIGTERM, report)
    uvicorn.run(served_app(kind), port=port, loop="uvloop", http="httptools", log_level="warning", access_log=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000, help="streams, then cache hits, per server")
    ap.add_argument("--serve", choices=["pt", "proxy"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        _serve(args.serve, args.port)
        return
    import httpx

    up = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UPSTREAM": f"http://127.0.0.1:{up}"}
    fake = subprocess.Popen([PY, "-m", "ollama_guard.testing.fake_ollama", "--port", str(up)], env=env)
    ports = {"pass-through": free_port(), "proxy": free_port()}
    servers = start_served(__file__, ports, env)
    try:
        wait_http(f"http://127.0.0.1:{up}/")
        for name, port in ports.items():
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/api/tags")
            with httpx.Client() as client:
                for _ in range(WARM_UP):
                    _first_chunk_ms(client, url)
                    client.post(url + "/api/chat", content=SAME_BODY)
                servers[name].send_signal(signal.SIGUSR1)
                # The counts start at the signal's arrival: wait for the server to have taken it (it answers
                # after its handler ran, since the handler runs between two of its event loop's callbacks).
                client.get(url + "/api/tags")
                for _ in range(args.requests):
                    _first_chunk_ms(client, url)
                for _ in range(args.requests):
                    client.post(url + "/api/chat", content=SAME_BODY)
    finally:
        outputs = stop_served(servers)
        fake.terminate()
        fake.wait(10)
    total = 2 * args.requests
    print(f"garbage collections in the server, {args.requests} streams then {args.requests} cache hits each")
    print(f"{'':14} {'gen 0':>7} {'gen 1':>7} {'gen 2':>7} {'ms in all':>10} {'ms / 1,000 requests':>20}")
    for name, out in outputs.items():
        out = out.strip()
        if not out:
            print(f"{name:14} (no report)")
            continue
        g0, g1, g2, ms = out.split()
        print(f"{name:14} {g0:>7} {g1:>7} {g2:>7} {float(ms):>10.1f} {float(ms) / total * 1000:>20.2f}")


if __name__ == "__main__":
    main()
