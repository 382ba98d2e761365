"""Make the cluster match the desired children: create, patch what changed, delete what is no longer desired.

Each applied object carries a hash of its desired manifest; an object whose hash matches is left alone,
so a reconcile with nothing to change writes nothing. Children are found by label, per kind.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .builders import ANN_CREATE_ONLY, GROUP, content_hash
from .kube import Kube, NotFound

ANN_HASH = f"{GROUP}/applied-hash"


@dataclass
class Outcome:
    """What one apply pass did, by "Kind/name", and the live objects afterwards."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    live: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.deleted)

    def merge(self, other: Outcome) -> None:
        self.created += other.created
        self.updated += other.updated
        self.deleted += other.deleted
        self.live.update(other.live)


def _labels_match(obj: dict[str, Any], selector: str) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def stamped(obj: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    annotations = out["metadata"].setdefault("annotations", {})
    annotations[ANN_HASH] = content_hash(obj)
    return out


async def apply_kind(
    kube: Kube,
    api_version: str,
    kind: str,
    namespace: str,
    selector: str,
    desired: Iterable[dict[str, Any]],
) -> Outcome:
    """Converge one kind: the objects of `kind` matching `selector` become exactly `desired`."""
    want = {o["metadata"]["name"]: o for o in desired if o["apiVersion"] == api_version and o["kind"] == kind}
    out = Outcome()
    # Filter by label here too: a selector is a request, and a mock server may ignore it.
    existing = {
        o["metadata"]["name"]: o
        for o in await kube.list(api_version, kind, namespace, selector)
        if _labels_match(o, selector)
    }
    for name, obj in want.items():
        current = existing.get(name)
        key = (kind, name)
        if current is None:
            out.live[key] = await kube.create(stamped(obj))
            out.created.append(f"{kind}/{name}")
        elif (current["metadata"].get("annotations") or {}).get(ANN_CREATE_ONLY) == "true":
            out.live[key] = current
        elif (current["metadata"].get("annotations") or {}).get(ANN_HASH) != content_hash(obj):
            out.live[key] = await kube.apply(stamped(obj))
            out.updated.append(f"{kind}/{name}")
        else:
            out.live[key] = current
    for name in existing.keys() - want.keys():
        await kube.delete(api_version, kind, namespace, name)
        out.deleted.append(f"{kind}/{name}")
    return out


async def get_or_none(
    kube: Kube, api_version: str, kind: str, namespace: str, name: str
) -> dict[str, Any] | None:
    try:
        return await kube.get(api_version, kind, namespace, name)
    except NotFound:
        return None
