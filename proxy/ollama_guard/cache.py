"""Scan verdict cache: Redis shared by all replicas, an in-memory LRU with TTL as the fallback.

`auto` uses Redis and falls back to memory the moment a Redis call fails, then tries Redis again after
`redis.retry_interval` seconds; no request ever fails because Redis is down. Keys are computed by the scan
engine from the policy fingerprint, the direction and the text, so a policy change never serves an old verdict.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from .redis_state import RedisBacked, RedisState
from .settings import CacheConfig, RedisConfig

log = logging.getLogger(__name__)


class MemoryCache:
    """LRU with per-entry expiry. Used only from the event loop thread, so it needs no lock."""

    name = "memory"

    def __init__(self, max_size: int, ttl: int):
        self.max_size = max_size
        self.ttl = ttl
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires < time.monotonic():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def set(self, key: str, value: bytes) -> None:
        self._data[key] = (time.monotonic() + self.ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_size:
            self._data.popitem(last=False)

    def clear(self) -> int:
        n = len(self._data)
        self._data.clear()
        return n

    def purge_expired(self) -> int:
        now = time.monotonic()
        dead = [k for k, (exp, _) in self._data.items() if exp < now]
        for k in dead:
            del self._data[k]
        return len(dead)

    def __len__(self) -> int:
        return len(self._data)


class RedisCache:
    name = "redis"

    def __init__(self, cfg: RedisConfig, ttl: int, client: Any = None):
        import redis.asyncio as aioredis

        self.cfg = cfg
        self.ttl = ttl
        self.prefix = f"{cfg.key_prefix}:verdict:"
        self.client = client or aioredis.Redis.from_url(
            cfg.connection_url(),
            password=cfg.password,
            max_connections=cfg.max_connections,
            socket_connect_timeout=cfg.socket_connect_timeout,
            socket_timeout=cfg.socket_timeout,
            retry_on_timeout=False,
            health_check_interval=30,
        )

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return list(await self.client.mget([self.prefix + k for k in keys]))

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for k, v in items:
                pipe.set(self.prefix + k, v, ex=self.ttl)
            await pipe.execute()

    async def clear(self) -> int:
        n = 0
        async for key in self.client.scan_iter(match=self.prefix + "*", count=500):
            n += await self.client.delete(key)
        return n

    async def size(self) -> int:
        n = 0
        async for _ in self.client.scan_iter(match=self.prefix + "*", count=1000):
            n += 1
        return n

    async def ping(self) -> None:
        await self.client.ping()

    async def close(self) -> None:
        await self.client.aclose()


class VerdictCache(RedisBacked):
    """The cache the engine talks to: picks the backend, falls back, counts."""

    def __init__(self, cfg: CacheConfig, redis_cfg: RedisConfig, metrics: Any = None):
        self.cfg = cfg
        self.metrics = metrics
        self.memory = MemoryCache(cfg.max_size, cfg.ttl)
        self.redis: RedisCache | None = RedisCache(redis_cfg, cfg.ttl) if cfg.backend in ("auto", "redis") else None
        self.state = RedisState(redis_cfg.retry_interval, "verdict cache")
        self.hits = 0
        self.misses = 0
        self._report_backend()

    @property
    def fallbacks(self) -> int:
        return self.state.fallbacks

    def _report_backend(self) -> None:
        if self.metrics is not None:
            self.metrics.cache_backend(self.backend)

    def _redis_ok(self) -> None:
        if not self.state.up:
            self.state.succeeded()
            self._report_backend()

    def _redis_failed(self, exc: BaseException) -> None:
        self.state.failed(exc)
        if self.metrics is not None:
            self.metrics.redis_error()
        self._report_backend()

    def _count(self, backend: str, values: Sequence[bytes | None]) -> None:
        hits = len(values) - values.count(None)
        self.hits += hits
        self.misses += len(values) - hits
        if self.metrics is not None:
            self.metrics.cache_lookup(backend, hits, len(values) - hits)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if self._use_redis():
            assert self.redis is not None
            try:
                values = await self.redis.get_many(keys)
                self._redis_ok()
                self._count("redis", values)
                return values
            except Exception as exc:  # any Redis failure: serve from memory, never fail the request
                self._redis_failed(exc)
        values = [self.memory.get(k) for k in keys]
        self._count("memory", values)
        return values

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        for k, v in items:
            self.memory.set(k, v)
        if self._use_redis():
            assert self.redis is not None
            try:
                await self.redis.set_many(items)
                self._redis_ok()
            except Exception as exc:
                self._redis_failed(exc)

    async def clear(self) -> dict[str, int]:
        out = {"memory": self.memory.clear()}
        if self.redis is not None:
            try:
                out["redis"] = await self.redis.clear()
                self._redis_ok()
            except Exception as exc:
                self._redis_failed(exc)
        return out

    def purge_expired(self) -> dict[str, int]:
        # Redis expires its own keys (SET ... EX); only the memory LRU needs sweeping.
        return {"memory": self.memory.purge_expired()}

    async def stats(self) -> dict[str, Any]:
        total = self.hits + self.misses
        out: dict[str, Any] = {
            "enabled": True,
            "configured_backend": self.cfg.backend,
            "backend": self.backend,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / total, 4) if total else 0.0,
            "memory_size": len(self.memory),
            "max_size": self.cfg.max_size,
            "ttl": self.cfg.ttl,
            "redis_errors": self.redis_errors,
            "fallbacks": self.fallbacks,
        }
        if self.backend == "redis" and self.redis is not None:
            try:
                out["redis_size"] = await self.redis.size()
            except Exception as exc:
                self._redis_failed(exc)
        return out

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()
