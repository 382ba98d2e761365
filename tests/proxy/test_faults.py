"""A misbehaving upstream, on every guarded route and stream mode: never a 500, never a hang, one audit record.

The fake Ollama fails as real upstreams fail when a body carries FAULT:<name> (fake_ollama.FAULTS): a body cut
short after its headers, a stall mid-body, no answer at all, a reset, HTTP 500 as JSON or as text, a 404, a
body that is not JSON, an empty body, a gzip lie. For each: the client gets a well-formed answer in its
dialect with the status the README's table gives, exactly one audit record, and the proxy keeps serving.
"""

from __future__ import annotations

import gc
import json
import logging
import time
import weakref
from typing import Any

import httpx
import pytest

from .conftest import wait_for
from .policies import BANNED_OUT, pure

pytestmark = pytest.mark.slow

ROUTES = {
    "/api/chat": lambda t, s: {"model": "m", "stream": s, "messages": [{"role": "user", "content": t}]},
    "/api/generate": lambda t, s: {"model": "m", "stream": s, "prompt": t},
    "/api/embed": lambda t, s: {"model": "m", "input": t},
    "/api/embeddings": lambda t, s: {"model": "m", "prompt": t},
    "/v1/chat/completions": lambda t, s: {"model": "m", "stream": s, "messages": [{"role": "user", "content": t}]},
    "/v1/completions": lambda t, s: {"model": "m", "stream": s, "prompt": t},
    "/v1/embeddings": lambda t, s: {"model": "m", "input": t},
}
# Faults that arrive after Ollama's 200 headers: a stream has started by then.
AFTER_HEADERS = {"short-body", "stall-body", "garbage", "empty"}
STREAMABLE = {"/api/chat", "/api/generate", "/v1/chat/completions", "/v1/completions"}
CASES = [(path, stream) for path in ROUTES for stream in ((False, True) if path in STREAMABLE else (False,))]
# fault -> the status the client gets
EXPECTED = {
    "short-body": 502,
    "stall-body": 504,
    "no-answer": 504,
    "reset": 502,
    "http500-json": 502,
    "http500-text": 502,
    "http404-json": 404,
    "garbage": 502,
    "empty": 502,
    "gzip-lie": 502,
}


@pytest.fixture(scope="module")
def proxy(upstream):
    from ollama_guard.settings import load_settings

    from .conftest import running_proxy

    overrides = pure(ollama_url=upstream.url, limits={"upstream_timeout": 1.0})
    with running_proxy(load_settings(overrides=overrides, environ={})) as p:
        yield p


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.audit: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "audit", None) is not None:
            self.audit.append(record.audit)  # type: ignore[attr-defined]


@pytest.fixture
def audit():
    handler = Records()
    logger = logging.getLogger("ollama_guard.audit")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(previous)


def error_message(path: str, body: Any) -> str:
    return body["error"]["message"] if path.startswith("/v1/") else body["error"]


@pytest.mark.parametrize("fault", list(EXPECTED))
@pytest.mark.parametrize(("path", "stream"), CASES, ids=[f"{p}-{'stream' if s else 'whole'}" for p, s in CASES])
def test_a_broken_upstream_gets_a_well_formed_answer_and_one_audit_record(
    proxy, audit: Records, path: str, stream: bool, fault: str
) -> None:
    started = time.monotonic()
    r = httpx.post(proxy.url + path, json=ROUTES[path](f"FAULT:{fault}", stream), timeout=30)
    assert time.monotonic() - started < 20  # bounded by the configured timeouts, not the fault's 60 s
    expected = EXPECTED[fault]
    if stream and fault in AFTER_HEADERS:
        # Ollama's 200 and the stream's headers went out first: the stream ends with the dialect's error.
        expected = 200
        lines = [line for line in r.text.splitlines() if line.strip()]
        if path.startswith("/v1/"):
            assert lines[-1] == "data: [DONE]"
            body = json.loads(lines[-2].removeprefix("data: "))
        else:
            body = json.loads(lines[-1])
    else:
        body = r.json()
    assert r.status_code == expected, r.text
    message = error_message(path, body)
    assert message and "Traceback" not in message
    if fault == "http500-json":
        assert "llama runner process has terminated" in message  # Ollama's JSON error, shown (scanned)
    wait_for(lambda: len(audit.audit) >= 1, 5, "an audit record")
    records = [a for a in audit.audit if a.get("route") == path]
    assert len(records) == 1, audit.audit
    assert records[0]["status"] == expected
    # One metrics label for the outcome: the request counter has this route at this status.
    metrics = httpx.get(proxy.url + "/metrics").text
    assert any(
        line.startswith("ollama_guard_requests_total{") and f'route="{path}"' in line and f'status="{expected}"' in line
        for line in metrics.splitlines()
    ), [line for line in metrics.splitlines() if line.startswith("ollama_guard_requests_total{")]
    # The proxy keeps serving.
    ok = httpx.post(proxy.url + path, json=ROUTES[path]("REPLY: fine", False), timeout=30)
    assert ok.status_code == 200


def _words(n: int) -> str:
    return " ".join(f"w{i:02d}" for i in range(n))  # n 4-character chunks: "w00 ", "w01 ", ...


def _paced_stream(chunks: int, delay_ms: float, stall_after: int | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {"fake_chunk_chars": 4, "fake_delay_ms": delay_ms}
    if stall_after is not None:
        options["fake_stall_after"] = stall_after
    return {"model": "m", "messages": [{"role": "user", "content": f"REPLY: {_words(chunks)}"}], "options": options}


def test_a_stream_that_goes_silent_mid_answer_ends_with_an_error_once_the_read_timeout_passes(proxy, audit) -> None:
    # Chunks arrive 20 ms apart, then none: the stall comes after the guard has read the stream for a while, when
    # only the guarded stream's own watch (upstream.StallWatch) times Ollama's silence, not aiohttp's timer.
    started = time.monotonic()
    r = httpx.post(proxy.url + "/api/chat", json=_paced_stream(30, 20, stall_after=12), timeout=30)
    elapsed = time.monotonic() - started
    assert r.status_code == 200
    lines = [json.loads(line) for line in r.text.splitlines() if line.strip()]
    assert "error" in lines[-1] and "done" not in lines[-1], lines[-1]
    text = "".join(line.get("message", {}).get("content", "") for line in lines[:-1])
    assert text and _words(30).startswith(text)  # what had passed before the stall went out
    assert 1.0 <= elapsed < 20, elapsed  # the configured 1 s of silence, not the fake's 60 s
    record = wait_for(lambda: [a for a in audit.audit if a.get("route") == "/api/chat"], 5, "the audit record")
    assert len(record) == 1


def test_a_slow_stream_whose_every_gap_is_shorter_than_the_read_timeout_is_not_cut(proxy) -> None:
    # 8 chunks 300 ms apart: 2.4 s in all, over the 1 s read timeout, which times silence, not the whole answer.
    r = httpx.post(proxy.url + "/api/chat", json=_paced_stream(8, 300), timeout=30)
    lines = [json.loads(line) for line in r.text.splitlines() if line.strip()]
    assert r.status_code == 200 and lines[-1].get("done") is True, lines[-1]
    assert "".join(line["message"]["content"] for line in lines) == _words(8)


def test_a_streamed_line_too_long_ends_the_stream_well_formed_and_a_long_final_line_passes(proxy) -> None:
    tokens = 200_000  # about 1.4 MB of context on the final line: more than aiohttp's default line limit
    body = {"model": "m", "prompt": "REPLY: Hi.", "options": {"fake_context_tokens": tokens}}
    ok = httpx.post(proxy.url + "/api/generate", json=body, timeout=30)
    final = json.loads(ok.text.splitlines()[-1])
    assert final["done"] is True and len(final["context"]) == tokens
    body = {"model": "m", "prompt": "REPLY: Hi.", "options": {"fake_line_bytes": 17 * 1024 * 1024}}
    r = httpx.post(proxy.url + "/api/generate", json=body, timeout=60)
    assert r.status_code == 200 and "error" in json.loads(r.text.splitlines()[-1])


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/../../api/pull",
        "/v1/models/..%2F..%2Fapi%2Fpull",
        "/v1/models/%2e%2e/%2e%2e/api/delete",
        "/v1/models/./x",
    ],
)
def test_path_tricks_never_reach_ollama(proxy, upstream, path: str) -> None:
    before = len(upstream.requests)
    with httpx.Client() as client:
        request = client.build_request("GET", proxy.url + "/")
        request.url = request.url.copy_with(raw_path=path.encode())
        r = client.send(request)
    assert r.status_code == 404
    assert len(upstream.requests) == before


def test_expect_100_continue_is_not_forwarded(proxy, upstream) -> None:
    before = len(upstream.requests)
    r = httpx.post(
        proxy.url + "/api/chat",
        json=ROUTES["/api/chat"]("REPLY: fine", False),
        headers={"Expect": "100-continue"},
    )
    assert r.status_code == 200
    assert "expect" not in {k.lower() for k in upstream.requests[before]["headers"]}


def test_admin_stats_never_show_a_password_inside_a_url(start_proxy) -> None:
    p = start_proxy(
        **pure(
            redis={"url": "redis://:hunter2-secret@127.0.0.1:1/0"},
            cache={"backend": "memory"},
            auth={"admin_token": "admin-test-token"},
        )
    )
    r = httpx.get(p.url + "/admin/stats", headers={"Authorization": "Bearer admin-test-token"})
    assert r.status_code == 200, r.text
    assert "hunter2-secret" not in r.text and "***" in r.text


# -- misbehaving clients, and the audit record of each outcome ---------------------------------------------


def test_a_request_refused_at_the_gate_is_audited(start_proxy, audit: Records) -> None:
    import hashlib

    key_hash = hashlib.sha256(b"the-key").hexdigest()
    p = start_proxy(**pure(auth={"enabled": True, "api_keys": [{"name": "team-a", "sha256": key_hash}]}))
    r = httpx.post(p.url + "/api/chat", json=ROUTES["/api/chat"]("hi", False))
    assert r.status_code == 401
    record = wait_for(lambda: [a for a in audit.audit if a.get("status") == 401], 5, "the gate's audit record")[0]
    assert record["route"] == "/api/chat" and record["decision"] == "denied"


def test_a_stream_the_client_abandons_is_audited(proxy, audit: Records) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "REPEAT 200: words and more words. "}],
        "options": {"fake_chunk_chars": 4, "fake_delay_ms": 20},
    }
    with httpx.Client(timeout=30) as client, client.stream("POST", proxy.url + "/api/chat", json=body) as r:
        for _ in r.iter_raw():
            break  # Open WebUI's Stop button: the client goes away mid-stream
    record = wait_for(
        lambda: [a for a in audit.audit if a.get("stream_abandoned")], 10, "the abandoned stream's record"
    )
    assert record[0]["status"] == 499 and record[0]["decision"] == "client_closed"


# How a stream ends: (route, the user's text, whether the client reads it to the end).
STREAM_ENDS = {
    "in full": ("/api/chat", "REPLY: a short answer, streamed in full.", True),
    "in full, OpenAI's dialect": ("/v1/chat/completions", "REPLY: a short answer, streamed in full.", True),
    "stopped by the guard": ("/api/chat", f"REPLY: here it comes: {BANNED_OUT} and more", True),
    "broken off by Ollama": ("/api/chat", "REPEAT 5: words FAULT:short-body", True),
    "left by the client": ("/api/chat", "REPEAT 200: words and more words. ", False),
}


@pytest.mark.parametrize("end", list(STREAM_ENDS))
def test_a_stream_is_freed_as_it_ends_not_left_for_the_cycle_collector(proxy, monkeypatch, end: str) -> None:
    """A stream that ended, however it ended, holds nothing in a reference cycle: its relay, Ollama's response
    and the request are freed at once, not at the garbage collector's next pass over its generations (inside
    the server, passes of 0.3-0.4 ms each on whichever request they fell, one every ~13 streams, when each
    stream left ~70 objects in a cycle: bench/gc_collections.py). The collector is off while the stream runs,
    so only reference counting can free it."""
    from ollama_guard.relay import GuardedStream

    relays: list[weakref.ref[GuardedStream]] = []
    init = GuardedStream.__init__

    def recorded(self: GuardedStream, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        relays.append(weakref.ref(self))

    monkeypatch.setattr(GuardedStream, "__init__", recorded)
    path, text, read_all = STREAM_ENDS[end]
    body = ROUTES[path](text, True) | {"options": {"fake_chunk_chars": 4, "fake_delay_ms": 0 if read_all else 20}}
    gc.disable()
    try:
        with httpx.Client(timeout=30) as client, client.stream("POST", proxy.url + path, json=body) as r:
            assert r.status_code == 200
            for _ in r.iter_raw():
                if not read_all:
                    break  # Open WebUI's Stop button
        wait_for(lambda: relays, 10, "the stream's relay")
        wait_for(lambda: relays[0]() is None, 10, "the ended stream to be freed without the cycle collector")
    finally:
        gc.enable()


def test_a_client_that_leaves_mid_body_is_counted_as_499_not_500(proxy, audit: Records) -> None:
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(proxy.url)
    with socket.create_connection((url.hostname, url.port)) as s:
        s.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            b'{"model":"m",'
        )
    record = wait_for(lambda: [a for a in audit.audit if a.get("status") == 499], 10, "a 499 record")
    assert record[0]["decision"] == "client_closed"
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'status="500"' not in metrics


def test_every_log_line_of_the_served_proxy_is_json_even_uvicorns(upstream, tmp_path) -> None:
    import socket
    import subprocess
    import sys

    from .conftest import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ollama_guard.cli", "serve", "--port", str(port), "--ollama-url", upstream.url],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/health"), 60, "the proxy to serve")
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
            s.recv(100)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert lines, "the proxy logged nothing"
    for line in lines:
        json.loads(line)  # every line, uvicorn's warning about the bad request included
    assert any("Invalid HTTP request" in line for line in lines)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize(("path", "stream"), CASES, ids=[f"{p}-{'stream' if s else 'whole'}" for p, s in CASES])
def test_ollama_refusing_connections_is_a_502_with_one_audit_record(start_proxy, audit: Records, path, stream) -> None:
    from .conftest import free_port

    p = start_proxy(**pure(ollama_url=f"http://127.0.0.1:{free_port()}"))  # nothing listens there
    r = httpx.post(p.url + path, json=ROUTES[path]("REPLY: hi", stream), timeout=30)
    assert r.status_code == 502
    body = r.json()
    assert "cannot reach Ollama" in error_message(path, body)
    if path.startswith("/v1/"):
        assert body["error"]["code"] == "upstream_connect"
    records = wait_for(lambda: [a for a in audit.audit if a.get("route") == path], 5, "an audit record")
    assert len(records) == 1 and records[0]["status"] == 502
    assert httpx.get(p.url + "/health").status_code == 200  # the proxy keeps serving


def test_a_client_that_gives_up_waiting_for_ollama_is_audited_as_499(proxy, audit: Records) -> None:
    with pytest.raises(httpx.TimeoutException):
        httpx.post(proxy.url + "/api/chat", json=ROUTES["/api/chat"]("FAULT:no-answer", False), timeout=0.3)
    record = wait_for(lambda: [a for a in audit.audit if a.get("status") == 499], 10, "a 499 record")
    assert record[0]["decision"] == "client_closed" and record[0]["route"] == "/api/chat"


def test_a_cookie_ollama_sets_for_one_client_never_goes_out_with_another_clients_request(start_proxy, upstream) -> None:
    # By host name, not address: aiohttp's default cookie jar ignores cookies from IP addresses, and the
    # Service name a cluster uses is a host name.
    proxy = start_proxy(ollama_url=upstream.url.replace("127.0.0.1", "localhost"), **pure())
    body = ROUTES["/api/chat"]
    first = httpx.post(proxy.url + "/api/chat", json=body("FAULT:set-cookie hello", False), timeout=30)
    assert first.status_code == 200
    before = len(upstream.requests)
    second = httpx.post(proxy.url + "/api/chat", json=body("a second client asks", False), timeout=30)
    assert second.status_code == 200
    sent = [r for r in upstream.requests[before:] if "a second client asks" in str(r["body"])]
    assert sent, "the second request reached Ollama"
    assert "Cookie" not in sent[0]["headers"] and "cookie" not in {k.lower() for k in sent[0]["headers"]}


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_an_ollama_header_that_is_not_latin1_text_reaches_the_client_as_it_came(proxy, path: str) -> None:
    # A gateway in front of Ollama may send a header value in UTF-8; HTTP allows any octets there
    # (RFC 9110 section 5.5). The proxy relays the bytes; it used to fail encoding them as latin-1 (a 503).
    from ollama_guard.testing.fake_ollama import UTF8_NOTE

    r = httpx.post(proxy.url + path, json=ROUTES[path]("FAULT:utf8-header hello", False), timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers.raw  # httpx keeps the raw bytes
    raw = dict((k.lower(), v) for k, v in r.headers.raw)
    assert raw[b"x-gateway-note"] == UTF8_NOTE.encode()
    assert r.headers["x-guard-decision"] == "allowed"
