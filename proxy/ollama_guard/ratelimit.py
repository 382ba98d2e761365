"""Token-bucket rate limits per client, shared by every replica through Redis.

Each client has two buckets: `burst` tokens refilled at `per_minute`/60 per second, and `per_hour` tokens
refilled at `per_hour`/3600 per second; a request takes one token from both. In Redis the whole check-and-take
is one Lua script run against Redis's own clock, so replicas never race each other or disagree on time. While
Redis is unreachable each replica enforces the same limits locally, and goes back to Redis when it returns.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .redis_state import RedisBacked, RedisState
from .settings import RateLimitConfig, RedisConfig

_LUA = """
local rate1, cap1 = tonumber(ARGV[1]), tonumber(ARGV[2])
local rate2, cap2 = tonumber(ARGV[3]), tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local d = redis.call('HMGET', KEYS[1], 'a', 'b', 'ts')
local a = tonumber(d[1]) or cap1
local b = tonumber(d[2]) or cap2
local ts = tonumber(d[3]) or now
local el = math.max(0, now - ts)
a = math.min(cap1, a + el * rate1)
b = math.min(cap2, b + el * rate2)
local allowed = 0
if a >= 1 and b >= 1 then
  a = a - 1
  b = b - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'a', tostring(a), 'b', tostring(b), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], ttl)
return {allowed, tostring(a), tostring(b)}
"""


@dataclass(frozen=True)
class Limits:
    per_minute: int
    per_hour: int
    burst: int

    @property
    def rate1(self) -> float:
        return self.per_minute / 60.0

    @property
    def rate2(self) -> float:
        return self.per_hour / 3600.0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int  # until the short bucket is full again
    retry_after: int  # seconds until one request would pass (0 when allowed)

    def headers(self) -> list[tuple[str, str]]:
        h = [
            ("X-RateLimit-Limit", str(self.limit)),
            ("X-RateLimit-Remaining", str(self.remaining)),
            ("X-RateLimit-Reset", str(self.reset_seconds)),
        ]
        if not self.allowed:
            h.append(("Retry-After", str(self.retry_after)))
        return h


def decide(limits: Limits, allowed: bool, a: float, b: float) -> Decision:
    """Turn bucket levels after the check into what the client is told."""
    wait = 0.0
    if not allowed:
        wa = (1 - a) / limits.rate1 if a < 1 else 0.0
        wb = (1 - b) / limits.rate2 if b < 1 else 0.0
        wait = max(wa, wb)
    reset = (limits.burst - a) / limits.rate1 if a < limits.burst else 0.0
    return Decision(
        allowed=allowed,
        limit=limits.per_minute,
        remaining=max(0, int(min(a, b))),
        reset_seconds=max(0, math.ceil(reset)),
        retry_after=max(1, math.ceil(wait)) if not allowed else 0,
    )


class LocalBuckets:
    """The same algorithm in-process: the fallback, and the backend when Redis is not configured."""

    def __init__(self, max_clients: int = 100_000):
        self._b: OrderedDict[str, tuple[float, float, float]] = OrderedDict()
        self.max_clients = max_clients

    def take(self, key: str, limits: Limits) -> Decision:
        now = time.monotonic()
        a, b, ts = self._b.get(key, (float(limits.burst), float(limits.per_hour), now))
        el = max(0.0, now - ts)
        a = min(limits.burst, a + el * limits.rate1)
        b = min(limits.per_hour, b + el * limits.rate2)
        allowed = a >= 1 and b >= 1
        if allowed:
            a -= 1
            b -= 1
        self._b[key] = (a, b, now)
        self._b.move_to_end(key)
        while len(self._b) > self.max_clients:
            self._b.popitem(last=False)
        return decide(limits, allowed, a, b)


class RateLimiter(RedisBacked):
    def __init__(self, cfg: RateLimitConfig, redis_cfg: RedisConfig, use_redis: bool, metrics: Any = None):
        self.cfg = cfg
        self.default = Limits(cfg.per_minute, cfg.per_hour, cfg.burst)
        self.local = LocalBuckets()
        self.metrics = metrics
        self.state = RedisState(redis_cfg.retry_interval, "rate limiting")
        self.prefix = f"{redis_cfg.key_prefix}:rl:"
        self.redis: Any = None
        self._script: Any = None
        if use_redis:
            import redis.asyncio as aioredis

            self.redis = aioredis.Redis.from_url(
                redis_cfg.connection_url(),
                password=redis_cfg.password,
                max_connections=redis_cfg.max_connections,
                socket_connect_timeout=redis_cfg.socket_connect_timeout,
                socket_timeout=redis_cfg.socket_timeout,
            )
            self._script = self.redis.register_script(_LUA)

    def limits_for(self, key_cfg: Any) -> Limits:
        if key_cfg is None:
            return self.default
        return Limits(
            key_cfg.per_minute or self.default.per_minute,
            key_cfg.per_hour or self.default.per_hour,
            key_cfg.burst or self.default.burst,
        )

    async def take(self, client: str, limits: Limits) -> Decision:
        if self._use_redis():
            try:
                ttl = max(60, math.ceil(limits.per_hour / limits.rate2))
                allowed, a, b = await self._script(
                    keys=[self.prefix + client],
                    args=[limits.rate1, limits.burst, limits.rate2, limits.per_hour, ttl],
                )
                self.state.succeeded()
                return decide(limits, bool(int(allowed)), float(a), float(b))
            except Exception as exc:  # Redis down: enforce locally, never fail the request
                self.state.failed(exc)
                if self.metrics is not None:
                    self.metrics.redis_error()
        return self.local.take(client, limits)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
