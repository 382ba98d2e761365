"""Proxy throughput and added latency against a local fake Ollama, side by side with calling it directly.

Starts the fake upstream and the proxy (`ollama-guard serve`, one worker), then drives both with wrk:
- cache hit / nothing new to scan: the same non-streaming /api/chat body again and again;
- unique prompts: a fresh ~300-character prompt per request (wrk Lua), so every request is scanned;
at concurrency 1 and 16. Also the time to the first streamed chunk (direct vs proxy, concurrency 1) and the
proxy's idle memory. Prints a table; never asserts.

    .venv/bin/python bench/proxy_bench.py [--duration 8] [--backend memory|redis]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
POLICY = {
    "input_scanners": [
        {"type": "InvisibleText"},
        {"type": "Secrets", "action": "sanitize"},
        {"type": "TokenLimit", "params": {"limit": 4096}},
    ],
    "output_scanners": [{"type": "Secrets", "action": "sanitize"}],
}
SAME_BODY = json.dumps(
    {
        "model": "llama3.2",
        "stream": False,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }
)
UNIQUE_LUA = r"""
local counter = 0
local words = {"alpha","bravo","charlie","delta","echo","foxtrot","golf","hotel","india","juliet","kilo","lima"}
request = function()
  counter = counter + 1
  local parts = {}
  local n = counter + math.random(1, 1000000000)
  for i = 1, 45 do parts[i] = words[((n + i * 7) % #words) + 1] end
  local prompt = tostring(n) .. " " .. table.concat(parts, " ")
  prompt = string.sub(prompt, 1, 300)
  local body = '{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"' .. prompt .. '"}]}'
  return wrk.format("POST", "/api/chat", {["Content-Type"]="application/json"}, body)
end
"""
SAME_LUA = f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{SAME_BODY}'
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def wrk(url: str, script: Path, conns: int, duration: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "1" if conns == 1 else "2",
            "-c",
            str(conns),
            "-d",
            f"{duration}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for p in ("50", "99"):
        m = re.search(rf"\s{p}(?:\.000)?%\s+([\d.]+)(us|ms|s)", out)
        v, unit = float(m.group(1)), m.group(2)
        lat[p] = v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": lat["50"],
        "p99_ms": lat["99"],
        "non2xx": int(errors.group(1)) if errors else 0,
    }


def ttfc(url: str, n: int = 200) -> float:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "REPEAT 20: streamed words. "}]}
    times = []
    with httpx.Client() as c:
        for _ in range(n):
            t = time.perf_counter()
            with c.stream("POST", url + "/api/chat", json=body) as r:
                first = True
                for _ in r.iter_raw():
                    if first:
                        times.append((time.perf_counter() - t) * 1000)
                        first = False
    times.sort()
    return times[len(times) // 2]


def stream_scaling(url: str, sizes: tuple[int, ...] = (1_000, 4_000, 16_000, 64_000)) -> list[tuple[int, float]]:
    """Whole-stream time for answers of growing length (4-character chunks): linear scan work shows as a flat
    time per 1,000 characters."""
    out = []
    unit = "lorem ipsum dolor sit amet, consectetur. "
    with httpx.Client(timeout=120) as c:
        for n in sizes:
            body = {"model": "llama3.2", "messages": [{"role": "user", "content": f"REPEAT {n // len(unit)}: {unit}"}]}
            times = []
            for _ in range(3):
                t = time.perf_counter()
                with c.stream("POST", url + "/api/chat", json=body) as r:
                    for _ in r.iter_raw():
                        pass
                times.append((time.perf_counter() - t) * 1000)
            out.append((n, min(times)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--backend", default="memory", choices=["memory", "redis"])
    ap.add_argument("--model", choices=["minilm"], help="add a PromptInjection scanner on this model")
    ap.add_argument("--onnx", action="store_true", help="with --model: run it on ONNX Runtime")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    tmp = Path(tempfile.mkdtemp(prefix="og-bench-"))
    procs = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        up_port, px_port = free_port(), free_port()
        procs.append(subprocess.Popen([PY, "-m", "ollama_guard.testing.fake_ollama", "--port", str(up_port)], env=env))
        cfg = tmp / "config.yaml"
        import yaml

        policy = dict(POLICY, logging={"audit": False}, cache={"backend": args.backend, "max_size": 100000})
        if args.model:
            sys.path.insert(0, str(ROOT / "bench"))
            from scan_throughput import build_models

            model_dir = build_models(tmp / "models", [args.model])[args.model]
            policy["input_scanners"] = POLICY["input_scanners"] + [
                {
                    "type": "PromptInjection",
                    "params": {"threshold": 0.99},
                    "model": {"path": str(model_dir), "onnx": args.onnx},
                }
            ]
        if args.backend == "redis":
            rport = free_port()
            procs.append(
                subprocess.Popen(
                    ["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
                    stdout=subprocess.DEVNULL,
                )
            )
            policy["redis"] = {"url": f"redis://127.0.0.1:{rport}/0"}
        cfg.write_text(yaml.safe_dump(policy))
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
                    str(px_port),
                    "--ollama-url",
                    f"http://127.0.0.1:{up_port}",
                ],
                env=env,
            )
        )
        direct, proxy = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{px_port}"
        wait_http(direct + "/")
        wait_http(proxy + "/ready")
        time.sleep(1.0)
        import psutil

        rss_idle = psutil.Process(procs[-1].pid).memory_info().rss / 1e6
        same, unique = tmp / "same.lua", tmp / "unique.lua"
        same.write_text(SAME_LUA)
        unique.write_text(UNIQUE_LUA)
        httpx.post(proxy + "/api/chat", content=SAME_BODY)  # warm the cache
        rows = []
        for conns in (1, 16):
            d = wrk(direct + "/api/chat", same, conns, args.duration)
            h = wrk(proxy + "/api/chat", same, conns, args.duration)
            u = wrk(proxy + "/api/chat", unique, conns, args.duration)
            rows.append((conns, d, h, u))
        st = httpx.get(proxy + "/stats").json()
        t_direct, t_proxy = ttfc(direct), ttfc(proxy)
        scaling = [(n, d, p) for (n, d), (_, p) in zip(stream_scaling(direct), stream_scaling(proxy), strict=True)]
        extra = f", + PromptInjection on {args.model}{' (ONNX)' if args.onnx else ''}" if args.model else ""
        print(f"\nproxy bench ({args.backend} cache, 1 worker, {args.duration}s per cell, wrk{extra})")
        print(
            f"{'conc':>4} {'direct rps':>11} {'hit rps':>8} {'unique rps':>11}   p50/p99 ms: "
            f"{'direct':>15} {'hit':>13} {'unique':>15} {'non2xx':>7}"
        )
        for conns, d, h, u in rows:
            print(
                f"{conns:>4} {d['rps']:>11.0f} {h['rps']:>8.0f} {u['rps']:>11.0f}   {'':>11} "
                f"{d['p50_ms']:>7.2f}/{d['p99_ms']:<7.2f} {h['p50_ms']:>6.2f}/{h['p99_ms']:<6.2f} "
                f"{u['p50_ms']:>7.2f}/{u['p99_ms']:<7.2f} {h['non2xx'] + u['non2xx']:>7}"
            )
        print(
            f"added p50 at c=1: cache hit +{rows[0][2]['p50_ms'] - rows[0][1]['p50_ms']:.2f} ms, "
            f"unique prompts +{rows[0][3]['p50_ms'] - rows[0][1]['p50_ms']:.2f} ms"
        )
        print(
            f"streaming time to first chunk p50: direct {t_direct:.2f} ms, proxy {t_proxy:.2f} ms "
            f"(+{t_proxy - t_direct:.2f} ms)"
        )
        for n, d, p in scaling:
            print(
                f"whole stream of {n:>6} chars: direct {d:7.1f} ms, proxy {p:7.1f} ms "
                f"({(p - d) / n * 1000:.2f} ms added per 1,000 chars)"
            )
        print(f"cache hit rate {st['cache']['hit_rate']:.3f}; idle RSS with the default-style policy {rss_idle:.0f} MB")
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
