"""Secrets detection on a generated corpus: detected/total per kind and context, and false positives.

    .venv/bin/python bench/secrets_corpus.py [--per-kind 5]

Columns: llm-guard 0.3.16's own `Secrets` scanner, and ollama-guard's (`scanning/secrets.py`). A sample
counts as detected when none of its secret values survives the scan (for a PEM key, every body line; for an
AWS pair, both halves). False positives: benign samples (commit hashes, UUIDs, digests, base64 images ...)
whose text the scanner changed. Also prints the scan cost per KB of prose. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proxy"))

from llm_guard.input_scanners import Secrets as LLMGuardSecrets  # noqa: E402
from ollama_guard.logs import quiet_llm_guard  # noqa: E402
from ollama_guard.scanning.secrets import Secrets  # noqa: E402
from ollama_guard.testing.secret_corpus import CONTEXTS, benign_samples, secret_samples  # noqa: E402


def detected(scanner, sample) -> bool:
    try:
        out, _, _ = scanner.scan(sample.text)
    except Exception:  # noqa: BLE001 - ours raises when it cannot clean a text: the text is blocked
        return True
    return not any(v in out for v in sample.values)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-kind", type=int, default=5)
    args = ap.parse_args()
    quiet_llm_guard()
    scanners = {"llm-guard": LLMGuardSecrets(redact_mode="all"), "ollama-guard": Secrets(redact_mode="all")}
    samples = secret_samples(per_kind=args.per_kind)
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    ctx_counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for s in samples:
        for i, sc in enumerate(scanners.values()):
            hit = detected(sc, s)
            counts[(s.kind, "")][i] += hit
            ctx_counts[(s.kind, s.context)][i] += hit
        counts[(s.kind, "")][2] += 1
        ctx_counts[(s.kind, s.context)][2] += 1
    print(
        f"{'kind':<24} {'llm-guard':>10} {'ollama-guard':>13}   per context (ollama-guard: " + " ".join(CONTEXTS) + ")"
    )
    tot = [0, 0, 0]
    for (kind, _), (a, b, n) in counts.items():
        per_ctx = " ".join(f"{ctx_counts[(kind, c)][1]}/{ctx_counts[(kind, c)][2]}" for c in CONTEXTS)
        print(f"{kind:<24} {a:>4}/{n:<5} {b:>6}/{n:<6}   {per_ctx}")
        tot = [tot[0] + a, tot[1] + b, tot[2] + n]
    print(f"{'all':<24} {tot[0]:>4}/{tot[2]:<5} {tot[1]:>6}/{tot[2]:<6}")
    print()
    benign = benign_samples(per_kind=args.per_kind)
    fp: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for s in benign:
        for i, sc in enumerate(scanners.values()):
            out, _, _ = sc.scan(s.text)
            fp[s.kind][i] += out != s.text
        fp[s.kind][2] += 1
    print(f"{'false positives':<24} {'llm-guard':>10} {'ollama-guard':>13}")
    for kind, (a, b, n) in fp.items():
        print(f"{kind:<24} {a:>4}/{n:<5} {b:>6}/{n:<6}")
    print()
    prose = ("The deploy failed because the readiness probe timed out; raise the timeout and retry. " * 12)[:1024]
    for name, sc in scanners.items():
        sc.scan(prose)
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            sc.scan(prose)
        print(f"{name:<13} prose without secrets: {(time.perf_counter() - t0) / n * 1e3:.3f} ms per KB")


if __name__ == "__main__":
    main()
