"""Per-request scan budgets and fair sharing of the scan pool between requests.

A request's scans may use at most `limits.scan_budget_seconds` of scan time in total (the sum of its scan
jobs' wall time, prompts and answer alike). A job gets the budget left as its deadline; pattern scanners
check it cooperatively (`check()`, between scanners and between the lines Secrets examines), so a job over
budget stops within one line's work and frees its thread, where a timeout alone would leave the thread
running on. Over budget, the text is refused (`ScanBudgetExceeded`), whatever `block_on_guard_error` says:
a text not scanned to the end is never let through.

`FairSlots` hands the pool's threads to waiting scan jobs round-robin by request, with a cap per request, so
a request with many or long texts waits its turn behind one job of each other request, not the other way
round, and never holds every thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

BUDGET_ERROR = "scan budget exceeded"


class ScanBudgetExceeded(Exception):
    """The request used up its scan time; raised in the scanning thread."""

    def __str__(self) -> str:
        return BUDGET_ERROR


@dataclass(eq=False)
class RequestBudget:
    """Scan seconds one request may still use. One per guarded request (prompts, answer, stream); compared by
    identity, so it is also the request's FairSlots owner."""

    seconds: float
    used: float = 0.0

    def remaining(self) -> float:
        return self.seconds - self.used


current_budget: contextvars.ContextVar[RequestBudget | None] = contextvars.ContextVar("scan_budget", default=None)

_local = threading.local()


def enter(at: float | None) -> float | None:
    """From now on this thread's `check()` raises once `time.monotonic()` passes `at`; returns the deadline
    it replaces, for `leave`. (A pair of calls, not a context manager: scans run this per text.)"""
    previous: float | None = getattr(_local, "at", None)
    _local.at = at
    return previous


def leave(previous: float | None) -> None:
    """Back to the deadline `enter` replaced."""
    _local.at = previous


def check() -> None:
    """Raise ScanBudgetExceeded if this thread's scan job is past its deadline (cheap: one clock read)."""
    at = getattr(_local, "at", None)
    if at is not None and time.monotonic() > at:
        raise ScanBudgetExceeded


class FairSlots:
    """At most `capacity` jobs run at once, and at most `per_owner` of them for one owner (a request);
    waiting jobs get free slots round-robin across owners.

    FIFO would let one request that queued 50 jobs make every later request wait for all 50; and without the
    per-owner cap, one request with as many long texts as there are threads would hold them all."""

    def __init__(self, capacity: int, per_owner: int) -> None:
        self.capacity = capacity
        self.per_owner = per_owner
        self.used = 0
        self._held: dict[object, int] = {}
        self._waiting: OrderedDict[object, deque[asyncio.Future[None]]] = OrderedDict()

    def _free_for(self, owner: object) -> bool:
        return self.used < self.capacity and self._held.get(owner, 0) < self.per_owner

    def _take(self, owner: object) -> None:
        self.used += 1
        self._held[owner] = self._held.get(owner, 0) + 1

    @asynccontextmanager
    async def slot(self, owner: object) -> AsyncIterator[None]:
        if self._free_for(owner):
            self._take(owner)  # anyone still waiting is waiting on their own cap, not on this slot
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(owner, deque()).append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release(owner)  # the slot was handed to us as we were cancelled: pass it on
                else:
                    self._forget(owner, fut)
                raise
        try:
            yield
        finally:
            self._release(owner)

    def _forget(self, owner: object, fut: asyncio.Future[None]) -> None:
        queue = self._waiting.get(owner)
        if queue is not None:
            try:
                queue.remove(fut)
            except ValueError:
                pass
            if not queue:
                del self._waiting[owner]

    def _release(self, owner: object) -> None:
        self.used -= 1
        held = self._held[owner] - 1
        if held:
            self._held[owner] = held
        else:
            del self._held[owner]
        # Grant free slots to waiting owners in turn: the first in line under its cap gets one, then goes to
        # the back of the line if it has more jobs waiting.
        for candidate in list(self._waiting):
            if self.used >= self.capacity:
                return
            if not self._free_for(candidate):
                continue
            queue = self._waiting[candidate]
            while queue and queue[0].done():
                queue.popleft()
            if queue:
                self._take(candidate)
                queue.popleft().set_result(None)
            if queue:
                self._waiting.move_to_end(candidate)
            else:
                del self._waiting[candidate]
