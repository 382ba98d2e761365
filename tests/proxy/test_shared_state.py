"""Shared state across replicas through a real Redis: the verdict cache and the rate limits."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from .conftest import free_port, wait_for
from .policies import pure
from .redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()


def chat(url, text, **kw):
    return httpx.post(
        url + "/api/chat",
        json={"model": "m", "stream": False, "messages": [{"role": "user", "content": text}]},
        **kw,
    )


def stats(url):
    return httpx.get(url + "/stats").json()


def test_redis_killed_mid_run_loses_no_request_and_recovers(start_proxy, redis):
    p = start_proxy(
        **pure(cache={"backend": "auto"}, redis={"url": redis.url, "retry_interval": 0.2, "socket_timeout": 0.5})
    )
    statuses = []
    for i in range(120):
        if i == 40:
            redis.kill()
        if i == 80:
            redis.start()
        statuses.append(chat(p.url, f"question number {i % 30}").status_code)
        if i == 60:
            during = stats(p.url)["cache"]
    assert statuses == [200] * 120
    assert during["backend"] == "memory" and during["fallbacks"] >= 1 and during["redis_errors"] >= 1
    # Back on Redis once it returns (the next lookup after the retry interval).
    wait_for(
        lambda: chat(p.url, "after recovery").status_code == 200 and stats(p.url)["cache"]["backend"] == "redis",
        10,
        "cache back on redis",
    )


def _serve(redis_url: str, upstream_url: str, extra_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "OLLAMA_URL": upstream_url,
        "REDIS_URL": redis_url,
        "CACHE_BACKEND": "redis",
        **extra_env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "ollama_guard.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(url + "/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None

    wait_for(up, 60, "proxy process")
    assert proc.poll() is None
    return proc, url


@pytest.fixture
def two_processes(redis, upstream, tmp_path):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(pure(rate_limit={"enabled": True, "per_minute": 1, "per_hour": 1000, "burst": 5})))
    procs = [_serve(redis.url, upstream.url, {"OLLAMA_GUARD_CONFIG": str(cfg)}) for _ in range(2)]
    yield [u for _, u in procs]
    for proc, _ in procs:
        proc.terminate()
        proc.wait(10)


def test_two_processes_enforce_one_rate_limit(two_processes):
    a, b = two_processes
    results = [chat(url, "hello").status_code for url in [a, b] * 6]
    assert results.count(200) == 5 and results.count(429) == 7
    r = chat(b, "hello")
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-limit"] == "1" and r.headers["x-ratelimit-remaining"] == "0"


def test_same_text_hits_across_processes_and_policy_change_misses(two_processes, redis, upstream, tmp_path):
    a, b = two_processes
    text = "a question nobody asked before 7f3a"
    assert chat(a, text).status_code == 200
    hits_before = stats(b)["cache"]["hits"]
    assert chat(b, text).status_code == 200
    # Both the prompt's and the answer's verdicts come from A's scans.
    assert stats(b)["cache"]["hits"] == hits_before + 2
    # Another policy (one more banned word) on the same Redis: a miss, never the old verdict.
    import yaml

    policy = pure()
    policy["input_scanners"][1]["params"]["substrings"].append("ANOTHERWORD")
    cfg = tmp_path / "other.yaml"
    cfg.write_text(yaml.safe_dump(policy))
    proc, c = _serve(redis.url, upstream.url, {"OLLAMA_GUARD_CONFIG": str(cfg)})
    try:
        assert chat(c, text).status_code == 200
        s = stats(c)["cache"]
        # The input policy changed: its verdict is a miss. The output policy did not: still a hit.
        assert (s["hits"], s["misses"]) == (1, 1)
    finally:
        proc.terminate()
        proc.wait(10)


def test_memory_backend_caches_per_message_so_old_turns_are_not_rescanned(start_proxy):
    p = start_proxy(**pure())
    history = [{"role": "user", "content": "REPLY: first answer"}]
    httpx.post(p.url + "/api/chat", json={"model": "m", "stream": False, "messages": history})
    history += [{"role": "assistant", "content": "first answer"}, {"role": "user", "content": "REPLY: second answer"}]
    before = stats(p.url)["cache"]
    httpx.post(p.url + "/api/chat", json={"model": "m", "stream": False, "messages": history})
    after = stats(p.url)["cache"]
    assert after["hits"] - before["hits"] == 1  # the first turn
    # The new turns (the assistant turn as input, the new user turn) and the new answer.
    assert after["misses"] - before["misses"] == 3
    history += [{"role": "assistant", "content": "second answer"}, {"role": "user", "content": "REPLY: third"}]
    httpx.post(p.url + "/api/chat", json={"model": "m", "stream": False, "messages": history})
    last = stats(p.url)["cache"]
    assert last["hits"] - after["hits"] == 3 and last["misses"] - after["misses"] == 3  # old turns: cached


def test_rate_limits_hold_locally_while_redis_is_down_and_return_to_redis(start_proxy, redis):
    p = start_proxy(
        **pure(
            redis={"url": redis.url, "retry_interval": 0.2, "socket_timeout": 0.5},
            cache={"backend": "auto"},
            rate_limit={"enabled": True, "per_minute": 1, "burst": 3, "backend": "redis"},
        )
    )
    assert [chat(p.url, "a").status_code for _ in range(4)] == [200, 200, 200, 429]  # shared bucket in Redis
    redis.kill()
    # Redis gone: no request fails; this replica enforces the same limits with its own bucket.
    assert [chat(p.url, "b").status_code for _ in range(4)] == [200, 200, 200, 429]
    assert stats(p.url)["rate_limit"]["backend"] == "memory"
    redis.start()  # an empty Redis: the local bucket is spent, a fresh one waits in Redis
    wait_for(lambda: chat(p.url, "c").status_code == 200, 10, "rate limits back on redis")
    assert stats(p.url)["rate_limit"]["backend"] == "redis"


def test_redis_state_stays_down_until_a_call_succeeds():
    from ollama_guard.redis_state import RedisState

    waits = RedisState(retry_interval=3600, purpose="test")
    waits.failed(ConnectionError())
    assert (waits.backend, waits.should_try()) == ("memory", False)  # no retry before the interval

    state = RedisState(retry_interval=0, purpose="test")
    assert (state.backend, state.should_try()) == ("redis", True)
    state.failed(ConnectionError())
    state.failed(ConnectionError())
    # The retry interval has passed, but a retry due is not a Redis that answers: still on memory.
    assert (state.backend, state.should_try()) == ("memory", True)
    assert (state.errors, state.fallbacks) == (2, 1)  # one outage, two failed calls
    state.succeeded()
    assert state.backend == "redis"
    state.failed(TimeoutError())
    assert (state.errors, state.fallbacks) == (3, 2)


def test_strict_redis_cache_takes_the_replica_out_of_rotation_while_redis_is_down(start_proxy, redis):
    p = start_proxy(
        **pure(redis={"url": redis.url, "retry_interval": 0.2, "socket_timeout": 0.5}, cache={"backend": "redis"})
    )
    assert httpx.get(p.url + "/ready").status_code == 200
    redis.kill()
    r = wait_for(lambda: (r := httpx.get(p.url + "/ready")).status_code == 503 and r, 10, "not ready without Redis")
    assert "Redis does not answer" in " ".join(r.json()["reasons"])
    assert chat(p.url, "REPLY: still served").status_code == 200  # what reaches it is served, from memory
    redis.start()
    wait_for(lambda: httpx.get(p.url + "/ready").status_code == 200, 10, "ready again with Redis")
