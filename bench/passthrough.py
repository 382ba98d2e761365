"""The calibration row of bench/proxy_bench.py: a minimal Python pass-through proxy.

Raw ASGI under uvicorn (uvloop, httptools, one worker), one shared aiohttp session, no parsing: it reads the
body, forwards it to UPSTREAM and streams the answer back. Whatever the proxy does beyond this is the guard's
cost; the bench reports proxy figures as ratios to this one, measured in the same run on the same machine.

    UPSTREAM=http://127.0.0.1:11434 uvicorn bench.passthrough:app --loop uvloop --http httptools --port 8081
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp

UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:11434")
_session: aiohttp.ClientSession | None = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _session
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if _session is not None:
                    await _session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    assert _session is not None
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    async with _session.request(
        scope["method"], UPSTREAM + scope["path"], data=b"".join(chunks), headers={"Content-Type": "application/json"}
    ) as resp:
        ctype = resp.headers.get("Content-Type", "application/json").encode()
        await send({"type": "http.response.start", "status": resp.status, "headers": [(b"content-type", ctype)]})
        async for chunk in resp.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
