"""API keys, the admin token, IP filters, client IP from trusted proxies only, security headers, CORS."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from .policies import pure

pytestmark = pytest.mark.slow

KEY = "sk-team-a-123456"
ADMIN = "admin-secret-token"


def sha(v):
    return hashlib.sha256(v.encode()).hexdigest()


def chat(url, headers=None, text="hi"):
    return httpx.post(
        url + "/api/chat",
        headers=headers or {},
        json={"model": "m", "stream": False, "messages": [{"role": "user", "content": text}]},
    )


@pytest.fixture
def locked(start_proxy):
    return start_proxy(
        **pure(auth={"enabled": True, "api_keys": [{"name": "team-a", "sha256": sha(KEY)}], "admin_token": ADMIN})
    )


def test_api_keys_checked(locked, upstream):
    assert chat(locked.url).status_code == 401
    assert chat(locked.url, {"Authorization": "Bearer wrong"}).status_code == 401
    assert chat(locked.url, {"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert chat(locked.url, {"X-API-Key": KEY}).status_code == 200
    r = httpx.post(
        locked.url + "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # Our credential is not passed on to Ollama.
    assert "Authorization" not in upstream.requests[-1]["headers"]


def test_admin_token_checked(locked, start_proxy):
    assert httpx.post(locked.url + "/admin/cache/clear").status_code == 401
    assert httpx.post(locked.url + "/admin/cache/clear", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
    r = httpx.post(locked.url + "/admin/cache/clear", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and "cleared" in r.json()
    open_proxy = start_proxy(**pure())
    assert httpx.post(open_proxy.url + "/admin/cache/clear").status_code == 404  # off unless a token is set


def test_ip_filter_and_spoofed_forwarded_for(start_proxy):
    allow_other = start_proxy(**pure(ip_filter={"enabled": True, "allow": ["10.0.0.0/8", "fd00::/8"]}))
    r = chat(allow_other.url, {"X-Forwarded-For": "10.1.2.3"})
    assert r.status_code == 403  # the peer is 127.0.0.1, whatever the header says
    trusting = start_proxy(
        **pure(ip_filter={"enabled": True, "allow": ["10.0.0.0/8"], "trusted_proxies": ["127.0.0.1/32"]})
    )
    assert chat(trusting.url, {"X-Forwarded-For": "10.1.2.3"}).status_code == 200
    assert chat(trusting.url, {"X-Forwarded-For": "8.8.8.8"}).status_code == 403
    deny = start_proxy(**pure(ip_filter={"enabled": True, "deny": ["127.0.0.0/8"]}))
    assert chat(deny.url).status_code == 403
    assert httpx.get(deny.url + "/health").status_code == 200  # probes stay reachable


def test_rate_limit_identity_ignores_untrusted_forwarded_for(start_proxy):
    p = start_proxy(**pure(rate_limit={"enabled": True, "per_minute": 1, "burst": 2, "backend": "memory"}))
    codes = [chat(p.url, {"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(4)]
    assert codes == [200, 200, 429, 429]


def test_per_key_limits(start_proxy):
    p = start_proxy(
        **pure(
            auth={
                "enabled": True,
                "api_keys": [
                    {"name": "small", "sha256": sha("k1"), "burst": 1, "per_minute": 1},
                    {"name": "big", "sha256": sha("k2"), "burst": 3, "per_minute": 1},
                ],
            },
            rate_limit={"enabled": True, "per_minute": 1, "burst": 2, "backend": "memory"},
        )
    )
    small = [chat(p.url, {"X-API-Key": "k1"}).status_code for _ in range(3)]
    big = [chat(p.url, {"X-API-Key": "k2"}).status_code for _ in range(4)]
    assert small == [200, 429, 429] and big == [200, 200, 200, 429]


def test_security_headers_on_every_response(start_proxy):
    p = start_proxy(**pure())
    for r in (
        chat(p.url),
        httpx.get(p.url + "/health"),
        httpx.get(p.url + "/nope"),
        httpx.get(p.url + "/api/tags"),
    ):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert "strict-transport-security" not in r.headers
        assert r.headers["x-request-id"]
    tls = start_proxy(**pure(tls=True))
    assert "max-age" in httpx.get(tls.url + "/health").headers["strict-transport-security"]


def test_scanner_scores_are_not_shown_to_callers_unless_configured(start_proxy):
    """Scores tell a caller how near a text came to being blocked: an oracle to tune an attack against."""
    closed = start_proxy(**pure())
    opened = start_proxy(**pure(scanners_header=True))
    for text, status in (("hi", 200), ("FORBIDDENPROMPT", 403), ("my key is AKIAIOSFODNN7EXAMPLE", 200)):
        shut, shown = chat(closed.url, text=text), chat(opened.url, text=text)
        assert (shut.status_code, shown.status_code) == (status, status)
        assert "x-guard-scanners" not in shut.headers and shut.headers["x-guard-decision"]
        assert "input:Secrets;score=" in shown.headers["x-guard-scanners"]
    streamed = httpx.post(
        closed.url + "/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert streamed.status_code == 200 and "x-guard-scanners" not in streamed.headers


def test_request_id_is_taken_from_the_client(start_proxy):
    p = start_proxy(**pure())
    assert chat(p.url, {"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"


def test_cors_closed_by_default_and_configurable(start_proxy):
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    closed = start_proxy(**pure())
    assert "access-control-allow-origin" not in httpx.options(closed.url + "/api/chat", headers=pre).headers
    opened = start_proxy(**pure(cors={"allow_origins": ["https://app.example"]}))
    r = httpx.options(opened.url + "/api/chat", headers=pre)
    assert r.headers["access-control-allow-origin"] == "https://app.example"


def test_browsers_get_cors_headers_with_api_keys_on_and_their_origin_never_reaches_ollama(start_proxy, upstream):
    origin = "https://app.example"
    p = start_proxy(
        **pure(
            cors={"allow_origins": [origin]},
            auth={"enabled": True, "api_keys": [{"name": "team-a", "sha256": sha(KEY)}]},
        )
    )
    preflight = httpx.options(
        p.url + "/api/chat",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200  # no key needed for a preflight
    assert preflight.headers["access-control-allow-origin"] == origin
    refused = httpx.post(p.url + "/api/chat", json={"model": "m", "messages": []}, headers={"Origin": origin})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == origin
    before = len(upstream.requests)
    ok = httpx.post(
        p.url + "/api/chat",
        json={"model": "m", "stream": False, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Origin": origin, "Authorization": f"Bearer {KEY}"},
    )
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == origin
    assert "origin" not in {k.lower() for k in upstream.requests[before]["headers"]}
