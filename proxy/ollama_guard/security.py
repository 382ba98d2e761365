"""Who is calling and whether they may: client IP, IP allow/deny lists, API keys, the admin token.

The client IP is the socket peer. Only when the peer is inside a configured trusted-proxy network is
X-Forwarded-For consulted, and then the right-most address that is not itself a trusted proxy is taken, so a
client cannot pick its own IP by sending the header.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .settings import ApiKey, AuthConfig, ConfigError, IPFilterConfig

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _nets(items: list[str]) -> list[Network]:
    return [ipaddress.ip_network(x, strict=False) for x in items]


@functools.lru_cache(maxsize=4096)
def _addr(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in `value` (IPv4-mapped IPv6 as IPv4), or None. Cached: the same peers come back."""
    try:
        addr = ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=4096)
def _peer(value: str) -> str:
    """The address in `value` written the standard way (IPv4-mapped IPv6 as IPv4), or `value` itself when it is
    not an address (a Unix socket's name). Cached: the same peers come back."""
    addr = _addr(value)
    return value if addr is None else str(addr)


class ClientIP:
    def __init__(self, trusted_proxies: list[str]):
        self.trusted = _nets(trusted_proxies)

    def _is_trusted(self, addr: Any) -> bool:
        return any(addr.version == n.version and addr in n for n in self.trusted)

    def resolve(self, peer: str | None, forwarded_for: str | None) -> str:
        if not peer:
            return "unknown"
        if not self.trusted or not forwarded_for:
            return _peer(peer)
        addr = _addr(peer)
        if addr is None:
            return peer
        if not self._is_trusted(addr):
            return str(addr)
        for hop in reversed(forwarded_for.split(",")):
            hop_addr = _addr(hop)
            if hop_addr is None:
                break
            if not self._is_trusted(hop_addr):
                return str(hop_addr)
            addr = hop_addr
        return str(addr)


class IPFilter:
    def __init__(self, cfg: IPFilterConfig):
        self.enabled = cfg.enabled
        self.allow = _nets(cfg.allow)
        self.deny = _nets(cfg.deny)

    def permits(self, ip: str) -> bool:
        if not self.enabled:
            return True
        addr = _addr(ip)
        if addr is None:
            return False
        if any(addr.version == n.version and addr in n for n in self.deny):
            return False
        if not self.allow:
            return True
        return any(addr.version == n.version and addr in n for n in self.allow)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    name: str
    key: ApiKey | None


def _load_keys_file(path: str) -> list[ApiKey]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"auth.api_keys_file: cannot read {path}: {exc.strerror}") from exc
    data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if isinstance(data, dict):
        data = data.get("api_keys", [])
    if not isinstance(data, list):
        raise ConfigError(f"auth.api_keys_file: {path} must hold a list of keys")
    try:
        return [ApiKey.model_validate(item) for item in data]
    except Exception as exc:
        raise ConfigError(f"auth.api_keys_file: {path}: {exc}") from exc


def _read_secret(value: str | None, path: str | None, what: str) -> str | None:
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from exc
    return value or None


class Authenticator:
    def __init__(self, cfg: AuthConfig):
        self.enabled = cfg.enabled
        keys = list(cfg.api_keys)
        if cfg.api_keys_file:
            keys += _load_keys_file(cfg.api_keys_file)
        self.keys = keys
        if self.enabled and not keys:
            raise ConfigError("auth.enabled is true but no API keys are configured (auth.api_keys or api_keys_file)")
        admin = _read_secret(cfg.admin_token, cfg.admin_token_file, "auth.admin_token_file")
        self._admin_hash = hash_key(admin) if admin else None

    @property
    def admin_configured(self) -> bool:
        return self._admin_hash is not None

    @staticmethod
    def presented(headers: dict[bytes, bytes]) -> str | None:
        auth = headers.get(b"authorization")
        if auth:
            scheme, _, token = auth.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        key = headers.get(b"x-api-key")
        return key.decode("latin-1").strip() if key else None

    def check_key(self, presented: str | None) -> Principal | None:
        if not presented:
            return None
        digest = hash_key(presented)
        found = None
        # Compare against every key, in constant time each, whatever matched.
        for k in self.keys:
            if hmac.compare_digest(digest, k.sha256):
                found = k
        return Principal(found.name, found) if found else None

    def check_admin(self, presented: str | None) -> bool:
        if not presented or self._admin_hash is None:
            return False
        return hmac.compare_digest(hash_key(presented), self._admin_hash)
