"""Probe a ScanNode's /health over HTTP with a short timeout."""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiohttp

from .spec import ScanNodeSpec


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency_ms: int
    device: str | None = None
    version: str | None = None
    message: str = ""


async def probe(session: aiohttp.ClientSession, node: ScanNodeSpec) -> ProbeResult:
    """Healthy means HTTP 200 with a JSON body whose status is "ok"; anything else says why not."""
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=node.probe.timeout_seconds)
    try:
        async with session.get(node.health_url, timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                return ProbeResult(False, _ms(started), message=f"{node.health_path} answered HTTP {resp.status}")
            body = await resp.json(content_type=None)
    except TimeoutError:
        return ProbeResult(False, _ms(started), message=f"no answer within {node.probe.timeout_seconds}s")
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return ProbeResult(False, _ms(started), message=f"{type(exc).__name__}: {exc}"[:300])
    if not isinstance(body, dict) or body.get("status") != "ok":
        return ProbeResult(False, _ms(started), message=f"{node.health_path} did not report status ok")
    device = body.get("device")
    version = body.get("version")
    return ProbeResult(
        True,
        _ms(started),
        device=str(device) if device else None,
        version=str(version) if version else None,
        message="ok",
    )


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
