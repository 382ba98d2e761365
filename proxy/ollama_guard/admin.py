"""Admin endpoints (`/admin/*`, behind the admin token, off unless an admin token is set): the verdict cache
and the effective settings, never a secret: API keys by name only, every URL's password redacted."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from .responses import make_response
from .state import ProxyState

log = logging.getLogger("ollama_guard.app")


class AdminEndpoints:
    def __init__(self, state: ProxyState):
        self.st = state

    async def admin_cache_clear(self, request: Request) -> Response:
        removed = await self.st.cache.clear() if self.st.cache else {}
        log.info("verdict cache cleared by admin", extra={"removed": removed})
        return make_response(orjson.dumps({"cleared": removed}), 200, [], "application/json")

    async def admin_cache_cleanup(self, request: Request) -> Response:
        removed = self.st.cache.purge_expired() if self.st.cache else {}
        return make_response(orjson.dumps({"expired_removed": removed}), 200, [], "application/json")

    async def admin_stats(self, request: Request) -> Response:
        st = self.st
        body = {
            "settings": _without_credentials(
                st.settings.model_dump(mode="json", exclude={"auth": True, "redis": {"password"}})
            ),
            "policy_fingerprints": st.policy.fingerprints if st.policy else {},
            "scanners": {f"{s.direction}/{s.name}": s.describe() for s in (st.policy.all() if st.policy else [])},
            "api_keys": [k.name for k in (st.auth.keys if st.auth else [])],
        }
        return make_response(orjson.dumps(body), 200, [], "application/json")


def redact_url(url: str | None) -> str | None:
    """`url` with the password of its userinfo replaced (redis://:secret@host -> redis://:***@host)."""
    if not url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _without_credentials(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings shown by /admin/stats: every URL's password redacted."""
    redis = settings.get("redis")
    if isinstance(redis, dict) and isinstance(redis.get("url"), str):
        redis["url"] = redact_url(redis["url"])
    if isinstance(settings.get("ollama_url"), str):
        settings["ollama_url"] = redact_url(settings["ollama_url"])
    return settings
