"""The HTTP client to Ollama: one pooled aiohttp session per process, owned by the app's lifespan.

aiohttp was measured against httpx for this job (bench/upstream_clients.py): its pool holds up under
concurrency where httpx's collapses, and it is already a dependency of kopf.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import aiohttp

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "proxy-connection",
        # The proxy answers `Expect: 100-continue` itself (its server reads the body); sent on, it would make
        # Ollama wait for a continuation that never comes from us.
        "expect",
    }
)


# Headers a browser sends that are not Ollama's business: the proxy has done the CORS check, and Ollama refuses
# any `Origin` missing from its own OLLAMA_ORIGINS with a 403, so passed on they would make it refuse what the
# guard allowed.
BROWSER_ONLY = frozenset({"origin", "referer"})


class UpstreamError(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def forward_headers(headers: Iterable[tuple[str, str]], drop: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    out = []
    for k, v in headers:
        lk = k.lower()
        if lk in HOP_BY_HOP or lk in drop:
            continue
        out.append((k, v))
    return out


_HOP_BY_HOP_RAW = frozenset(h.encode("latin-1") for h in HOP_BY_HOP)


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Ollama's response headers as they go on to the client: ASGI raw pairs (names lower-cased), the hop-by-hop
    ones and Content-Length (the proxy sets its own) left out. `raw` is aiohttp's `ClientResponse.raw_headers`:
    bytes as received, so a value that is not latin-1 text passes as it came instead of failing to encode."""
    out = []
    for k, v in raw:
        k = k.lower()
        if k not in _HOP_BY_HOP_RAW:
            out.append((k, v))
    return out


class StallWatch:
    """The read timeout of a streamed body, kept lazily: Ollama may stay silent at most `timeout` seconds while
    the stream waits for it, as aiohttp's `sock_read` has it, but without moving a timer on every network read.

    aiohttp re-arms its `sock_read` timer on each read (a cancel and a `call_later`, ~1.6 us with uvloop; a
    stream from a model at speed is one read per token). Here the reader notes when each wait begins (`since`,
    from the loop's clock) and when it ends (`since = None`); one timer checks now and then and re-arms itself
    for the current wait. A wait that reaches `timeout` fails the body with aiohttp's ServerTimeoutError,
    which the pending read raises, as `sock_read` would. Construction turns the connection's own `sock_read`
    off for the rest of this response (aiohttp's `ResponseHandler.read_timeout` setter; were it to stop
    working, aiohttp's timer would run as well, and only the saving would be lost)."""

    __slots__ = ("loop", "timeout", "content", "since", "handle")

    def __init__(self, resp: aiohttp.ClientResponse, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.content = resp.content
        self.since: float | None = None  # when the current wait for Ollama began; None while not waiting
        self.handle: asyncio.TimerHandle | None = self.loop.call_at(self.loop.time() + timeout, self._check)
        if resp.connection is not None:
            resp.connection.protocol.read_timeout = None  # type: ignore[union-attr]

    def _check(self) -> None:
        since, now = self.since, self.loop.time()
        if since is not None and now - since >= self.timeout:
            self.handle = None
            self.content.set_exception(aiohttp.ServerTimeoutError("Timeout on reading data from socket"))
            return
        self.handle = self.loop.call_at((now if since is None else since) + self.timeout, self._check)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class Upstream:
    def __init__(self, base_url: str, connect_timeout: float, read_timeout: float, pool_size: int = 512):
        self.base_url = base_url.rstrip("/")
        self.read_timeout = read_timeout
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        self._pool_size = pool_size
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._pool_size, limit_per_host=self._pool_size, keepalive_timeout=30, ttl_dns_cache=60
        )
        # Bodies are relayed as Ollama sent them; guarded routes ask for identity encoding.
        # No cookie jar: the session is shared by every client, so a cookie Ollama (or a gateway in front of
        # it) set on one answer would otherwise go out with everybody's later requests.
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def open(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes | None
    ) -> aiohttp.ClientResponse:
        """Send the request and return once the response headers arrived. The caller releases it."""
        assert self.session is not None
        try:
            return await self.session.request(
                method, self.base_url + path, headers=headers, data=body, allow_redirects=False
            )
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(502, "connect", f"cannot reach Ollama at {self.base_url}: {exc.os_error}") from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamError(504, "timeout", "Ollama did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(502, "protocol", f"bad response from Ollama: {type(exc).__name__}") from None

    @staticmethod
    async def read(resp: aiohttp.ClientResponse) -> bytes:
        """The whole body of a response `open` returned. Raises UpstreamError: 504 when Ollama stalls mid-body
        past the read timeout, 502 when the body breaks off (fewer bytes than Content-Length, a reset)."""
        try:
            return await resp.read()
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamError(504, "timeout", "Ollama stopped sending its answer") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(502, "protocol", f"Ollama's answer broke off: {type(exc).__name__}") from None

    async def health(self) -> tuple[bool, float | None]:
        """Ollama answers GET / with 200: (reachable, seconds)."""
        assert self.session is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with self.session.get(self.base_url + "/", timeout=aiohttp.ClientTimeout(total=2)) as r:
                await r.read()
                return r.status == 200, loop.time() - started
        except (aiohttp.ClientError, TimeoutError):
            return False, None
