"""Whether Redis is usable right now, shared logic for the verdict cache and the rate limiter.

Redis counts as down from the first failed call until a call succeeds again. While it is down, callers use
their in-memory fallback and try Redis again at most once every `retry_interval` seconds, so a dead Redis
costs one failed connection attempt per interval, not one per request.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)


class RedisState:
    def __init__(self, retry_interval: float, purpose: str):
        self.retry_interval = retry_interval
        self.purpose = purpose
        self.up = True
        self._next_try = 0.0
        self.errors = 0
        self.fallbacks = 0

    @property
    def backend(self) -> str:
        return "redis" if self.up else "memory"

    def should_try(self) -> bool:
        return self.up or time.monotonic() >= self._next_try

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        self._next_try = time.monotonic() + self.retry_interval
        if self.up:
            self.up = False
            self.fallbacks += 1
            log.warning("redis unavailable (%s); %s falls back to memory", type(exc).__name__, self.purpose)

    def succeeded(self) -> None:
        if not self.up:
            self.up = True
            log.warning("redis reachable again; %s back on redis", self.purpose)


class RedisBacked:
    """A component with an optional Redis client and its RedisState: the cache and the rate limiter."""

    redis: Any
    state: RedisState

    @property
    def backend(self) -> str:
        return self.state.backend if self.redis is not None else "memory"

    @property
    def redis_errors(self) -> int:
        return self.state.errors

    def _use_redis(self) -> bool:
        return self.redis is not None and self.state.should_try()

    async def reachable(self) -> bool:
        """Whether Redis answers a PING now (and the state knows it); False without a Redis client."""
        if self.redis is None:
            return False
        try:
            await self.redis.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means not reachable
            self.state.failed(exc)
            return False
        self.state.succeeded()
        return True
