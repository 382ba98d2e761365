"""Configuration: one validated object, from a YAML file plus environment variables.

The original proxy's keys keep working: its flat top-level keys (``cache_enabled``, ``rate_limit_per_minute``,
``enable_ip_filter``, ``ip_whitelist`` ...) are folded into the sections below, and its environment variables
(``OLLAMA_URL``, ``LLM_GUARD_DEVICE``, ``MPS_ENABLE_FP16``, ``CACHE_MAX_SIZE`` ...) override the file. Any key
may also be set as ``OLLAMA_GUARD_<KEY>`` (nested with ``__``). An unknown key, in the file or in an
``OLLAMA_GUARD_`` variable, stops the process with a message naming it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "OLLAMA_GUARD_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=True)


class ModelRef(_Section):
    """Where an ML scanner's weights live."""

    path: str = Field(description="Directory under models_path (or absolute) holding the weights.")
    hf_repo: str | None = Field(None, description="Hugging Face repo that `models pull` downloads from.")
    revision: str | None = None
    """The repo revision `models pull` downloads (branch, tag or commit)."""
    onnx: bool = False
    """Run the model on ONNX Runtime (`<path>/onnx/model.onnx`, exported at first load if missing)."""
    quantize: Literal["none", "int8"] = "none"
    """`int8`: 8-bit weights (`<path>/onnx/model.int8.onnx`), ~2.5x faster on a CPU, probabilities a few
    thousandths off float32's. Needs `onnx: true`."""
    max_length: int = Field(512, ge=8, le=8192)
    """Tokens per window, special tokens included (capped at the tokenizer's own limit)."""
    batch_size: int = Field(16, ge=1, le=512)
    """Cross-request batching: at most this many concurrent texts (and rows) share one forward pass."""
    batch_wait_ms: float = Field(2.0, ge=0, le=100)
    """The longest a batch waits for company, counted from its first request's arrival."""
    windows: Literal["head_tail", "chunks", "truncate"] = "head_tail"
    """What a text longer than one window is scanned as: its first and last window, every window, or the first."""

    @model_validator(mode="after")
    def _quantize_needs_onnx(self) -> ModelRef:
        if self.quantize != "none" and not self.onnx:
            raise ValueError(f"quantize: {self.quantize} runs on ONNX Runtime: set onnx: true on this model")
        return self


class ScannerConfig(_Section):
    type: str
    name: str | None = None
    action: Literal["block", "sanitize", "report"] = "block"
    required: bool = True
    enabled: bool = True
    params: dict[str, Any] = Field(default_factory=dict)
    model: ModelRef | None = None
    # How the scanner sees a streamed answer: pattern windows, sentence windows, the whole text at the
    # end, or the whole answer held back until it has passed. "auto" picks by scanner type.
    stream: Literal["auto", "pattern", "sentence", "final", "buffer"] = "auto"
    stream_overlap: int | None = Field(None, ge=1, le=65536)
    timeout: float = Field(30.0, gt=0)

    @property
    def display_name(self) -> str:
        return self.name or self.type


class CacheConfig(_Section):
    enabled: bool = True
    """Cache scan verdicts per text."""
    backend: Literal["auto", "redis", "memory"] = "memory"
    """`auto`: Redis, falling back to memory while Redis fails; `redis`: the same fallback for requests, but
    `/ready` fails while Redis does not answer, so a replica without the shared cache leaves the Service;
    `memory`."""
    ttl: int = Field(3600, ge=1)
    """Seconds a verdict is kept."""
    max_size: int = Field(10000, ge=1)
    """Verdicts kept in memory (LRU). Plan ~0.5 kB a verdict, so ~5 MB per 10,000 entries (measured:
    bench/cache_memory.py, 315 B of RSS a verdict at the default 10,000; tests/proxy/test_cache_memory.py);
    a request stores two (its prompt's and its answer's)."""


class RedisConfig(_Section):
    url: str | None = None
    """redis:// or rediss:// URL; overrides host/port/db/tls."""
    host: str = "localhost"
    port: int = Field(6379, ge=1, le=65535)
    db: int = Field(0, ge=0)
    password: str | None = None
    """Env: REDIS_PASSWORD."""
    tls: bool = False
    """Use TLS (rediss) when no url is given."""
    max_connections: int = Field(50, ge=1)
    socket_connect_timeout: float = Field(1.0, gt=0)
    socket_timeout: float = Field(1.0, gt=0)
    # After a failure, how long to serve from memory before trying Redis again.
    retry_interval: float = Field(2.0, gt=0)
    key_prefix: str = "ollama-guard"
    """Prefix of every key the proxy writes."""

    def connection_url(self) -> str:
        if self.url:
            return self.url
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


class RateLimitConfig(_Section):
    enabled: bool = False
    """Token-bucket limits per API key (or client IP without one)."""
    per_minute: int = Field(60, ge=1)
    """Sustained rate: tokens refilled per minute."""
    per_hour: int = Field(1000, ge=1)
    """Hourly budget."""
    burst: int = Field(10, ge=1)
    """Requests allowed at once before the per-minute rate applies."""
    backend: Literal["auto", "redis", "memory"] = "auto"
    """`auto`: Redis when the cache uses Redis, shared by all replicas."""


class ApiKey(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key; keys are never stored")
    per_minute: int | None = Field(None, ge=1)
    per_hour: int | None = Field(None, ge=1)
    burst: int | None = Field(None, ge=1)


class AuthConfig(_Section):
    enabled: bool = False
    """Require an API key (Authorization: Bearer, or X-API-Key)."""
    api_keys: list[ApiKey] = Field(default_factory=list)
    """Keys as {name, sha256, per_minute?, per_hour?, burst?}."""
    api_keys_file: str | None = None
    """A YAML/JSON list of such keys (e.g. a mounted Secret)."""
    admin_token: str | None = None
    """Token for /admin/*; without one /admin/* is off."""
    admin_token_file: str | None = None
    """File holding the admin token."""


class IPFilterConfig(_Section):
    enabled: bool = False
    """Apply the allow and deny lists."""
    allow: list[str] = Field(default_factory=list)
    """CIDRs allowed (empty: all not denied)."""
    deny: list[str] = Field(default_factory=list)
    """CIDRs refused."""
    # Peers in these networks may set X-Forwarded-For; everyone else's header is ignored.
    trusted_proxies: list[str] = Field(default_factory=list)

    @field_validator("allow", "deny", "trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"not an IP network: {item!r}") from exc
        return value


class CorsConfig(_Section):
    allow_origins: list[str] = Field(default_factory=list)
    """Browser origins allowed; empty: CORS closed."""
    allow_credentials: bool = False
    allow_methods: list[str] = Field(default_factory=lambda: ["GET", "POST", "OPTIONS"])
    allow_headers: list[str] = Field(
        default_factory=lambda: ["Authorization", "Content-Type", "X-API-Key", "X-Request-ID"]
    )


class LimitsConfig(_Section):
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="whole request body (images included)")
    max_prompt_chars: int = Field(100_000, ge=1, description="each prompt or message text")
    max_messages: int = Field(100, ge=1)
    model_name_pattern: str = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,254}$"
    body_read_timeout: float = Field(30.0, gt=0, description="a client must send its body within this time")
    upstream_connect_timeout: float = Field(5.0, gt=0)
    upstream_timeout: float = Field(600.0, gt=0, description="no byte from Ollama for this long: 504")
    max_concurrent_scans: int = Field(256, ge=1)
    scan_budget_seconds: float = Field(
        10.0, gt=0, description="scan time one request may use, prompts and answer together: over it, 413"
    )

    @field_validator("model_name_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        re.compile(value)
        return value


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(True, alias="json")
    audit: bool = True
    """One audit record per guarded request."""
    # Raw prompts and answers never reach the logs unless this is set.
    log_content: bool = False
    """Put raw prompts in audit records (off: never)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, use_attribute_docstrings=True)


class ManagementConfig(_Section):
    # Ollama's pull/push/create/copy/delete: refused unless enabled.
    allow_model_management: bool = False
    """Allow Ollama's pull/push/create/copy/delete through the proxy."""
    # /admin/* needs the admin token; with no token configured it is off.
    admin_enabled: bool = True
    """Serve /admin/* when an admin token is set."""


class StreamConfig(_Section):
    # Pattern scanners run when this many new characters arrived (bounds scan work to O(n)).
    pattern_step: int = Field(32, ge=1)
    # Held back before the word still running at the scanned end: a match whose part before its last word
    # is at most this long is always seen whole (token-shaped secrets with their keyword prefix).
    default_overlap: int = Field(64, ge=1)
    sentence_context_chars: int = Field(200, ge=0)


class Settings(_Section):
    proxy_host: str = "127.0.0.1"
    """Address to listen on; the images set 0.0.0.0."""
    proxy_port: int = Field(8080, ge=1, le=65535)
    """Port to listen on."""
    ollama_url: str = "http://localhost:11434"
    """The Ollama server the proxy guards."""
    workers: int = Field(1, ge=1, le=64)
    """uvicorn worker processes; metrics are aggregated across them (a scrape may miss the last second of
    another worker's counts)."""

    enable_input_guard: bool = True
    """Scan prompts (user messages, and system/tool messages by the keys below)."""
    enable_output_guard: bool = True
    """Scan answers, streamed or whole."""
    block_on_guard_error: bool = True
    """A scanner that errors or times out blocks (fail closed); false lets the text through."""
    # What a blocked chat gets: an error in its dialect, or a normal assistant message saying so.
    blocked_response: Literal["error", "message"] = "error"
    """`error`: an error in the caller's dialect; `message`: a normal assistant answer saying so."""
    blocked_message: str = "This request was blocked by the guard."
    """The answer text for a blocked prompt when `blocked_response: message`."""
    answer_blocked_message: str = "The answer was stopped by the guard."
    """The text for an answer the guard blocked or stopped: the answer with `blocked_response: message`, and
    the notice at the end of a stopped NDJSON stream (`stream_stop_notice`). Always on a line of its own."""
    stream_stop_notice: bool = True
    """End an NDJSON stream the guard stopped with `answer_blocked_message` as its last text chunk, before
    the final chunk (`done_reason: guard_blocked`, `guard`): clients that show only text (Open WebUI's
    native connection) then show why the answer ends. SSE streams end with an error event instead."""
    scanners_header: bool = False
    """Send `X-Guard-Scanners` with each guarded answer: every scanner's top score and scan time (ms). Off by
    default: the scores tell a caller how near a text came to being blocked, which helps tune an attack until
    it passes. Operators have the scores of the scanners that fired and every scan time in the audit log
    (`scores`, `scan_ms`), and the scan times in the metrics."""
    scan_system_messages: bool = True
    """Scan system (and OpenAI developer) messages and /api/generate's `system`: a caller can put anything
    there, and Open WebUI puts retrieved documents there. False trusts every caller's system prompt."""
    scan_assistant_messages: bool = True
    """Scan the assistant turns of the history (content, thinking, tool-call arguments): a caller can forge
    them. Each is cached per text, so a conversation still scans only its new turns."""
    scan_tool_messages: bool = True
    """Scan tool results (role `tool`): the text a tool fetched is where indirect prompt injection hides."""
    scan_tool_definitions: bool = True
    """Scan the tools a request offers: each tool's description and the descriptions and enum values of its
    parameters, which the model reads like a system prompt."""
    allow_generate_context: bool = False
    """Accept `context` token arrays on /api/generate. The guard cannot read tokens, so by default they are
    refused with a 400 pointing to /api/chat; allowing them lets a client send text the guard never saw."""
    short_circuit: bool = False
    """Skip model scanners once a pattern scanner already blocked (saves time, loses scores)."""

    use_local_models: bool = True
    """Load model weights only from `models_path` (never from the hub)."""
    models_path: str = "./models"
    """Directory holding one folder of weights per model scanner."""
    device: Literal["auto", "mps", "cuda", "cpu"] = "auto"
    """Model device; `auto` picks MPS, then CUDA, then CPU. Env: LLM_GUARD_DEVICE."""
    mps_enable_fp16: bool = False
    """Half precision on Apple Silicon. Env: MPS_ENABLE_FP16."""
    cuda_enable_fp16: bool = False
    """Half precision on NVIDIA GPUs."""
    torch_threads: int | None = Field(None, ge=1)
    """torch intra-op threads; default: the cores this process may use."""
    scan_workers: int | None = Field(None, ge=1, le=256)
    """Threads that run scans; default max(4, 2 x cores)."""
    scan_inline_max_chars: int = Field(2048, ge=0)
    """Texts up to this long are scanned by the bounded pure scanners (Secrets, InvisibleText, BanSubstrings,
    TokenLimit ...; not Regex) on the event loop: a hand-off to a pool thread costs more than such a scan.
    0: never."""

    input_scanners: list[ScannerConfig] | None = None
    """Ordered prompt scanners; absent: the built-in default policy."""
    output_scanners: list[ScannerConfig] | None = None
    """Ordered answer scanners; absent: the built-in default policy."""

    cache: CacheConfig = Field(default_factory=CacheConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    ip_filter: IPFilterConfig = Field(default_factory=IPFilterConfig)
    cors: CorsConfig = Field(default_factory=CorsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    management: ManagementConfig = Field(default_factory=ManagementConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    metrics_enabled: bool = True
    """Serve /metrics and record Prometheus metrics."""
    tls: bool = Field(False, description="set when served over TLS (enables HSTS)")

    @model_validator(mode="before")
    @classmethod
    def _fold_legacy_keys(cls, data: Any) -> Any:
        return fold_legacy_keys(data) if isinstance(data, Mapping) else data

    @field_validator("ollama_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _unique_scanner_names(self) -> Settings:
        for direction in ("input_scanners", "output_scanners"):
            names = [s.display_name for s in getattr(self, direction) or []]
            dupes = {n for n in names if names.count(n) > 1}
            if dupes:
                raise ValueError(f"{direction}: scanner names must be unique, give each a `name`: {sorted(dupes)}")
        return self


# The original proxy's flat keys -> (section, key).
LEGACY_KEYS: dict[str, tuple[str, str]] = {
    "cache_enabled": ("cache", "enabled"),
    "cache_backend": ("cache", "backend"),
    "cache_size": ("cache", "max_size"),
    "cache_max_size": ("cache", "max_size"),
    "cache_ttl": ("cache", "ttl"),
    "rate_limit_enabled": ("rate_limit", "enabled"),
    "rate_limit_per_minute": ("rate_limit", "per_minute"),
    "rate_limit_per_hour": ("rate_limit", "per_hour"),
    "rate_limit_burst": ("rate_limit", "burst"),
    "enable_ip_filter": ("ip_filter", "enabled"),
    "ip_whitelist": ("ip_filter", "allow"),
    "ip_blacklist": ("ip_filter", "deny"),
    "trusted_proxies": ("ip_filter", "trusted_proxies"),
}

# The original proxy's environment variables, and the ones the images and the operator set.
ENV_KEYS: dict[str, tuple[str, ...]] = {
    "OLLAMA_URL": ("ollama_url",),
    "PROXY_HOST": ("proxy_host",),
    "PROXY_PORT": ("proxy_port",),
    "WORKERS": ("workers",),
    "LLM_GUARD_DEVICE": ("device",),
    "MPS_ENABLE_FP16": ("mps_enable_fp16",),
    "MODELS_PATH": ("models_path",),
    "LLM_GUARD_USE_LOCAL_MODELS": ("use_local_models",),
    "CACHE_BACKEND": ("cache", "backend"),
    "CACHE_MAX_SIZE": ("cache", "max_size"),
    "CACHE_TTL": ("cache", "ttl"),
    "REDIS_URL": ("redis", "url"),
    "REDIS_HOST": ("redis", "host"),
    "REDIS_PORT": ("redis", "port"),
    "REDIS_DB": ("redis", "db"),
    "REDIS_PASSWORD": ("redis", "password"),
    "OLLAMA_GUARD_API_KEYS_FILE": ("auth", "api_keys_file"),
    "OLLAMA_GUARD_ADMIN_TOKEN": ("auth", "admin_token"),
    "OLLAMA_GUARD_ADMIN_TOKEN_FILE": ("auth", "admin_token_file"),
}
# OLLAMA_GUARD_* variables that are not config keys.
_ENV_NON_KEYS = {"OLLAMA_GUARD_CONFIG"}
_OPERATOR_PREFIX = "OLLAMA_GUARD_OPERATOR_"  # the operator's own settings


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key."""


def fold_legacy_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for flat, (section, key) in LEGACY_KEYS.items():
        if flat in out:
            value = out.pop(flat)
            sect = dict(out.get(section) or {})
            sect.setdefault(key, value)
            out[section] = sect
    # The original's `cache: {enabled, backend, ttl, max_size}` is already our shape.
    return out


def _set_path(target: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = target
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    known_sections = set(Settings.model_fields)
    for name, value in environ.items():
        if name in ENV_KEYS:
            _set_path(out, ENV_KEYS[name], _env_value(value))
        elif name.startswith(ENV_PREFIX) and name not in _ENV_NON_KEYS and not name.startswith(_OPERATOR_PREFIX):
            parts = tuple(p.lower() for p in name[len(ENV_PREFIX) :].split("__"))
            if parts[0] not in known_sections:
                raise ConfigError(f"unknown setting in environment variable {name}")
            _set_path(out, parts, _env_value(value))
    return out


def _env_value(value: str) -> Any:
    # Lists and mappings may be given as YAML/JSON (e.g. OLLAMA_GUARD_IP_FILTER__ALLOW='["10.0.0.0/8"]').
    stripped = value.strip()
    if stripped[:1] in "[{":
        try:
            return yaml.safe_load(stripped)
        except yaml.YAMLError:
            return value
    return value


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults < config file < environment < explicit overrides (command-line flags, tests)."""
    env = os.environ if environ is None else environ
    path = config_path or env.get("OLLAMA_GUARD_CONFIG")
    data: dict[str, Any] = fold_legacy_keys(read_config_file(path)) if path else {}
    data = _deep_merge(data, _env_overrides(env))
    if overrides:
        data = _deep_merge(data, fold_legacy_keys(overrides))
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path)) from exc


def format_validation_error(exc: ValidationError, path: Any = None) -> str:
    lines = [f"invalid configuration{f' in {path}' if path else ''}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)
