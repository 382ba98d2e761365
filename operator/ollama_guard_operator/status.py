"""Status conditions as the Kubernetes API conventions describe them.

A condition keeps its lastTransitionTime while its status stays the same, so rewriting the same facts
leaves the object unchanged (and a no-op reconcile writes nothing).
"""

from __future__ import annotations

import datetime
from typing import Any

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
MONITORING = "Monitoring"


def now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def condition(type_: str, ok: bool, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    cond: dict[str, Any] = {
        "type": type_,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def merge_conditions(old: list[dict[str, Any]] | None, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The new conditions, each keeping the old lastTransitionTime when its status did not change."""
    previous = {c.get("type"): c for c in old or []}
    out = []
    for cond in new:
        prev = previous.get(cond["type"])
        stamp = prev.get("lastTransitionTime") if prev and prev.get("status") == cond["status"] else None
        out.append({**cond, "lastTransitionTime": stamp or now()})
    return out


def get_condition(status: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch from `old` to `new` for the keys `new` owns (empty when nothing changed).

    Keys of nested objects that `new` no longer has are set to None (removed), e.g. a disabled variant.
    """
    # At the top level only the keys `new` owns are compared: other writers' status keys stay.
    return _diff(old or {}, new, remove_missing=False)


def _diff(old: dict[str, Any], new: dict[str, Any], remove_missing: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {k: None for k in old.keys() - new.keys()} if remove_missing else {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = _diff(before, value)
            if sub:
                out[key] = sub
        elif before != value:
            out[key] = value
    return out
