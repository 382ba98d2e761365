"""Run the operator inside an asyncio program, against any API server: for tests and for embedding.

`ollama-guard-operator` (kopf run) is how it runs in a cluster; this runs the same handlers in-process, so
a test can drive a real cluster (e2e/) or the Kubernetes API mock (tests/operator/) and stop it cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import kopf

from . import handlers


@contextlib.asynccontextmanager
async def running_operator(
    cfg: Any, namespaces: Sequence[str] | None = None, ready_within: float = 60.0, graceful: bool = True
) -> AsyncIterator[None]:
    """The operator, watching `namespaces` (all, when None), with `cfg` as its kubernetes client
    configuration; yields once kopf is ready and stops it on exit. `graceful=False` cancels at once,
    without waiting for timers (for an API server that goes away with the test)."""
    handlers.use_configuration(cfg)
    # kopf cancels every task of the loop still running when it stops ("the loop is not fully ours"),
    # unless told to ignore it: the host program's tasks (a server, the test's own) must survive.
    host_tasks = asyncio.all_tasks()
    stop, ready = asyncio.Event(), asyncio.Event()
    scope: dict[str, Any] = {"namespaces": list(namespaces)} if namespaces else {"clusterwide": True}
    tasks = await kopf.spawn_tasks(
        registry=kopf.get_default_registry(),
        standalone=True,
        stop_flag=stop,
        ready_flag=ready,
        memo=kopf.Memo(),
        **scope,
    )
    runner = asyncio.create_task(kopf.run_tasks(tasks, ignored=host_tasks))
    try:
        await asyncio.wait_for(ready.wait(), ready_within)
        yield
    finally:
        stop.set()
        if not graceful:
            runner.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(runner, 20 if graceful else ready_within)
        handlers.use_configuration(None)
