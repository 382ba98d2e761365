"""In-process numbers for /stats: request rate, latency percentiles, per-scanner counts and latencies."""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any


def percentiles(values: list[float], ps: tuple[float, ...] = (50, 95, 99)) -> dict[str, float]:
    if not values:
        return {f"p{int(p)}": 0.0 for p in ps}
    s = sorted(values)
    return {f"p{int(p)}": round(s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))], 3) for p in ps}


class ScannerStats:
    __slots__ = ("scans", "fired", "errors", "ms")

    def __init__(self) -> None:
        self.scans = 0
        self.fired = 0
        self.errors = 0
        self.ms: deque[float] = deque(maxlen=1024)


class Stats:
    def __init__(self) -> None:
        self.started = time.time()
        self.total = 0
        self.decisions: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.latency_ms: deque[float] = deque(maxlen=4096)
        self.recent: deque[float] = deque(maxlen=100_000)  # request end times, for the rate
        self.scanners: dict[tuple[str, str], ScannerStats] = {}

    def request(self, status: int, decision: str, ms: float) -> None:
        self.total += 1
        self.decisions[decision] += 1
        self.statuses[status] += 1
        self.latency_ms.append(ms)
        self.recent.append(time.monotonic())

    def scanner(self, direction: str, name: str) -> ScannerStats:
        """The record of scanner `name` in `direction` ("input" or "output"), made on first use."""
        found = self.scanners.get((direction, name))
        if found is None:
            found = self.scanners[(direction, name)] = ScannerStats()
        return found

    def rate(self, window: float = 60.0) -> float:
        cutoff = time.monotonic() - window
        while self.recent and self.recent[0] < cutoff:
            self.recent.popleft()
        return round(len(self.recent) / window, 3)

    def snapshot(self) -> dict[str, Any]:
        return {
            "uptime_seconds": round(time.time() - self.started, 1),
            "requests": {
                "total": self.total,
                "per_second_1m": self.rate(),
                "by_decision": dict(self.decisions),
                "by_status": {str(k): v for k, v in self.statuses.items()},
                "latency_ms": percentiles(list(self.latency_ms)),
            },
            "scanners": {
                f"{d}/{name}": {
                    "scans": st.scans,
                    "fired": st.fired,
                    "errors": st.errors,
                    "latency_ms": percentiles(list(st.ms)),
                }
                for (d, name), st in sorted(self.scanners.items())
            },
        }
