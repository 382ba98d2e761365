"""Fixtures for the proxy: a fake Ollama and the real proxy under uvicorn, each on a free loopback port."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import uvicorn
from ollama_guard.app import create_app
from ollama_guard.settings import load_settings
from ollama_guard.testing.fake_ollama import FakeOllama


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class FakeOllamaThread:
    """The fake upstream on its own event loop in a thread, so sync clients can call the proxy freely."""

    def __init__(self) -> None:
        self.fake = FakeOllama()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.url = ""

    def start(self) -> FakeOllamaThread:
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self.fake.start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.fake.requests


class ProxyThread:
    def __init__(self, settings: Any, policy: Any = None):
        self.app = create_app(settings, policy)
        self.port = free_port()
        cfg = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            date_header=False,
            server_header=False,
            proxy_headers=False,
        )
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> ProxyThread:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), 60, "proxy start")
        if not self.server.started:
            raise RuntimeError("proxy failed to start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def state(self) -> Any:
        return self.app.state.proxy


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeOllamaThread]:
    fake = FakeOllamaThread().start()
    yield fake
    fake.stop()


@pytest.fixture
def start_proxy(upstream: FakeOllamaThread) -> Iterator[Callable[..., ProxyThread]]:
    """start_proxy(**settings_overrides) -> a running proxy in front of the fake Ollama."""
    started: list[ProxyThread] = []

    def start(**overrides: Any) -> ProxyThread:
        overrides.setdefault("ollama_url", upstream.url)
        overrides.setdefault("logging", {"json": True})
        settings = load_settings(overrides=overrides, environ={})
        p = ProxyThread(settings).start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@contextmanager
def running_proxy(settings: Any) -> Iterator[ProxyThread]:
    p = ProxyThread(settings).start()
    try:
        yield p
    finally:
        p.stop()
