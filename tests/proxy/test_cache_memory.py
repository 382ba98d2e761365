"""Memory per cached verdict: what a site plans for (docs/CONFIG.md, cache.max_size). Counted by tracemalloc,
so the figure is exact and the same on a loaded machine; bench/cache_memory.py measures RSS at a full cache."""

from __future__ import annotations

import hashlib
import tracemalloc

from ollama_guard.cache import MemoryCache
from ollama_guard.scanning.engine import ScanResult, Verdict


def test_a_cached_verdict_costs_under_a_kilobyte() -> None:
    cache = MemoryCache(max_size=20_000, ttl=3600)
    results = [
        ScanResult("InvisibleText", True, 0.0, 0.1, "block"),
        ScanResult("Secrets", True, 0.0, 0.2, "sanitize"),
        ScanResult("TokenLimit", True, 0.0, 0.1, "block"),
    ]
    n = 20_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            key = hashlib.sha256(str(i).encode()).hexdigest()
            cache.set(key, Verdict("x", False, False, False, list(results)).to_cache())
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    # ~450 bytes: the key, the compact JSON value, the LRU's node. (orjson's own bytes object kept a 4 KiB
    # buffer per value: 4.4 kB an entry before to_cache copied it.)
    assert per_entry < 1024, per_entry
