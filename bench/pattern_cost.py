"""CPU per KB of the pattern scanners, on English prose and on mixed-script prose (which takes the
normalised-view path), through the scanner classes the proxy loads (scanning/registry.py).

    .venv/bin/python bench/pattern_cost.py

Run it with PYTHONPATH pointing at another tree's `proxy/` to compare versions. Prints numbers only.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proxy"))

from ollama_guard.logs import quiet_llm_guard  # noqa: E402
from ollama_guard.scanning import registry  # noqa: E402

ENGLISH = "The deploy failed because the readiness probe timed out; raise the timeout and retry the rollout. "
MIXED = "Der Pod startet neu, η υπηρεσία απαντά, сервис отвечает — the café’s rollout «retries» 🚀 fine. "
SCANNERS = {
    "InvisibleText": {},
    "Secrets": {"redact_mode": "all"},
    "BanSubstrings": {"substrings": ["quokkafire", "forbidden topic", "internal codename"]},
    "Regex": {"patterns": [r"\bAKIA[0-9A-Z]{16}\b", r"\b\d{3}-\d{2}-\d{4}\b"]},
}


def per_kb(scan, text: str, seconds: float = 1.0) -> float:
    scan(text)
    n, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        scan(text)
        n += 1
    return (time.process_time() - start) / n * 1000 / (len(text.encode()) / 1024)


def main() -> None:
    quiet_llm_guard()
    print(f"{'scanner':<15} {'English ms/KB':>14} {'mixed-script ms/KB':>19}")
    for name, params in SCANNERS.items():
        scanner = registry.scanner_class(registry.INPUT_TYPES[name])(**params)
        en = (ENGLISH * 12)[:1024]
        mx = (MIXED * 12)[:1024]
        print(f"{name:<15} {per_kb(scanner.scan, en):>14.3f} {per_kb(scanner.scan, mx):>19.3f}")


if __name__ == "__main__":
    main()
