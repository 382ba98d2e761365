"""Compute device choice for model scanners: MPS, then CUDA, then CPU, unless LLM_GUARD_DEVICE says otherwise.

torch is imported only when a model scanner is configured; the pure-scanner default policy never pays for it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceChoice:
    name: str  # "mps" | "cuda" | "cpu"
    fp16: bool
    threads: int | None
    reason: str

    @property
    def torch_device(self) -> str:
        return "cuda:0" if self.name == "cuda" else self.name


def available_devices(torch: Any) -> dict[str, bool]:
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return {"mps": mps, "cuda": bool(torch.cuda.is_available()), "cpu": True}


def choose_device(requested: str, available: dict[str, bool], mps_fp16: bool, cuda_fp16: bool) -> DeviceChoice:
    """Pure: the device to use given what was asked for and what exists."""
    if requested != "auto":
        if not available.get(requested):
            return DeviceChoice("cpu", False, None, f"{requested} requested but not available; using cpu")
        name, reason = requested, f"{requested} requested"
    else:
        name = next(d for d in ("mps", "cuda", "cpu") if available.get(d))
        reason = "auto: first available of mps, cuda, cpu"
    fp16 = (name == "mps" and mps_fp16) or (name == "cuda" and cuda_fp16)
    return DeviceChoice(name, fp16, None, reason)


def cpu_threads(explicit: int | None) -> int:
    """Intra-op threads for torch on CPU: the cores this process may use (cgroup-aware through affinity)."""
    if explicit:
        return explicit
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def setup_torch(requested: str, mps_fp16: bool, cuda_fp16: bool, threads: int | None) -> DeviceChoice:
    import torch

    choice = choose_device(requested, available_devices(torch), mps_fp16, cuda_fp16)
    n = cpu_threads(threads)
    torch.set_num_threads(n)
    try:
        # Inter-op parallelism only adds contention: requests are already parallel across scan threads.
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process
    log.info("compute device %s (fp16=%s, torch threads=%d): %s", choice.name, choice.fp16, n, choice.reason)
    return DeviceChoice(choice.name, choice.fp16, n, choice.reason)
