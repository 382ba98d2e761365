"""Make the cluster match the desired children: create, patch what changed, delete what is no longer desired.

Every write of a child is a server-side apply under one field manager, creation included, so the API server
removes a field that an earlier apply set and the desired manifest no longer has (a Redis URL once Redis is
off, an API-key volume once auth is off). A field set by a POST or merge patch belongs to an `Update` entry
of the same manager name, which an apply never prunes (shared/k8s-real/03a): children an older operator
created that way have that entry folded into our Apply entry once, before their next apply (`adopt_fields`).

Each applied object carries a hash of its desired manifest. An object is re-applied when that hash differs
(the GuardProxy changed) or when the live object no longer says what we set (`drifted`: someone edited a
field by hand); otherwise it is left alone, so a reconcile with nothing to change writes nothing.
Children are found by label, per kind.
"""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from kubernetes.utils import parse_quantity

from .builders import ANN_CREATE_ONLY, GROUP, content_hash
from .kube import FIELD_MANAGER, Kube, NotFound

ANN_HASH = f"{GROUP}/applied-hash"


@dataclass
class Outcome:
    """What one apply pass did, by "Kind/name", and the live objects afterwards."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    # "Kind/name: first differing path" of children re-applied because a hand edit made them drift.
    repaired: list[str] = field(default_factory=list)
    live: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.deleted or self.repaired)

    def merge(self, other: Outcome) -> None:
        self.created += other.created
        self.updated += other.updated
        self.deleted += other.deleted
        self.repaired += other.repaired
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


# Where the API server rewrites a quantity into its canonical form ("1000m" -> "1", "1024Mi" -> "1Gi"):
# anything under resources' limits/requests (and a claim's storage), an emptyDir's sizeLimit, and an
# HPA metric target's value/averageValue.
_QUANTITY_PARENTS = frozenset({"limits", "requests"})
_QUANTITY_KEYS = frozenset({"sizeLimit", "averageValue"})
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _is_quantity(keys: tuple[str, ...]) -> bool:
    if not keys:
        return False
    if keys[-1] in _QUANTITY_KEYS:
        return True
    return len(keys) >= 2 and (keys[-2] in _QUANTITY_PARENTS or keys[-2:] == ("target", "value"))


def _empty(value: Any) -> bool:
    """What the API server leaves out of an object (Go's omitempty): null, "", false, 0, [], and a map
    of only such values."""
    if value is None or value is False or value == "" or value == []:
        return True
    if isinstance(value, dict):
        return all(_empty(v) for v in value.values())
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def _quantity(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        return parse_quantity(value)
    except ValueError:
        return None


def _scalar_equal(want: Any, got: Any, quantity: bool) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return want is got
    if want == got:
        return True
    if quantity:
        a, b = _quantity(want), _quantity(got)
        return a is not None and a == b
    # A port or IntOrString given as 8080 and read back as "8080", or the other way round.
    if isinstance(want, int) and isinstance(got, str) or isinstance(want, str) and isinstance(got, int):
        return str(want) == str(got)
    return False


def _join(path: str, key: str) -> str:
    if _PLAIN_KEY.match(key):
        return f"{path}.{key}" if path else key
    return f'{path}["{key}"]'


def _list_key(items: list[Any]) -> str | None:
    """Match list items by "name" when every desired item has a distinct one (containers, env, ports, ...)."""
    names = [item.get("name") for item in items if isinstance(item, dict)]
    if items and len(names) == len(items) and None not in names and len(set(names)) == len(names):
        return "name"
    return None


def _diff(want: Any, got: Any, path: str, keys: tuple[str, ...]) -> str | None:
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return None if _empty(want) and _empty(got) else path
        for key, value in want.items():
            sub = _join(path, key)
            if value is None:
                continue  # we do not set it
            if got.get(key) is None:
                if _empty(value):
                    continue
                return sub
            found = _diff(value, got[key], sub, (*keys, key))
            if found is not None:
                return found
        return None
    if isinstance(want, list):
        if not isinstance(got, list):
            return None if _empty(want) and _empty(got) else path
        key = _list_key(want)
        if key is not None:
            # Extra live items are not ours to judge (server-side apply merges such lists by key).
            by_key = {item.get(key): item for item in got if isinstance(item, dict)}
            for item in want:
                sub = f"{path}[{item[key]}]"
                if item[key] not in by_key:
                    return sub
                found = _diff(item, by_key[item[key]], sub, keys)
                if found is not None:
                    return found
            return None
        for i, item in enumerate(want):
            if i >= len(got):
                return f"{path}[{i}]"
            found = _diff(item, got[i], f"{path}[{i}]", keys)
            if found is not None:
                return found
        return f"{path}[{len(want)}]" if len(got) > len(want) else None
    if got is None:
        return None if _empty(want) else path
    return None if _scalar_equal(want, got, _is_quantity(keys)) else path


def drifted(desired: dict[str, Any], live: dict[str, Any]) -> str | None:
    """The first path where `live` no longer says what `desired` sets, or None.

    Only the fields `desired` sets are compared: what the API server or other controllers add (defaults,
    clusterIP, status, extra annotations) is not drift. Lists whose desired items all have distinct names
    are matched by name, others by position; quantities compare by value, ports as int or string, and an
    empty value matches an absent one.
    """
    want = {k: v for k, v in desired.items() if k != "status"}
    if isinstance(want.get("stringData"), dict) and "stringData" not in live:
        # The API server folds stringData into data (base64) and never returns it.
        data = dict(want.get("data") or {})
        for key, value in want.pop("stringData").items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        want["data"] = data
    return _diff(want, live, "", ())


def our_entries(live: dict[str, Any], operation: str) -> list[int]:
    """Indexes of `live`'s managedFields entries of our manager with this operation: "Update" (written by
    POST/PATCH) or "Apply" (server-side apply); status-subresource entries left out."""
    return [
        i
        for i, entry in enumerate((live.get("metadata") or {}).get("managedFields") or [])
        if entry.get("manager") == FIELD_MANAGER
        and entry.get("operation") == operation
        and not entry.get("subresource")
    ]


def _union(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _union(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


async def adopt_fields(kube: Kube, live: dict[str, Any]) -> None:
    """Move the fields our manager owns through Update entries (children an older operator POSTed) into
    its Apply entry, so the next apply owns, and can prune, every field we ever set; kubectl's
    client-side-to-server-side upgrade (csaupgrade) does the same. The write is guarded by the object's
    resourceVersion: a concurrent change fails it (422) and the next pass tries again.

    A write that sets managedFields is taken as given by the API server (Kubernetes docs, Server-Side
    Apply, "Clearing managedFields")."""
    updates = our_entries(live, "Update")
    if not updates:
        return
    entries = list(live["metadata"]["managedFields"])
    ours = set(updates) | set(our_entries(live, "Apply"))
    fields: dict[str, Any] = {}
    for i in sorted(ours):
        fields = _union(fields, entries[i].get("fieldsV1") or {})
    kept = [e for i, e in enumerate(entries) if i not in ours]
    kept.append(
        {
            "manager": FIELD_MANAGER,
            "operation": "Apply",
            "apiVersion": live["apiVersion"],
            "fieldsType": "FieldsV1",
            "fieldsV1": fields,
        }
    )
    meta = live["metadata"]
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": meta.get("resourceVersion")},
        {"op": "replace", "path": "/metadata/managedFields", "value": kept},
    ]
    await kube.json_patch(live["apiVersion"], live["kind"], meta.get("namespace"), meta["name"], ops)


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
            create_only = (obj["metadata"].get("annotations") or {}).get(ANN_CREATE_ONLY) == "true"
            # A create-only child (a generated password, a one-off Job) is POSTed: never overwritten if
            # another writer made it first. Those are never re-applied, so their Update entry is harmless.
            out.live[key] = await (kube.create if create_only else kube.apply)(stamped(obj))
            out.created.append(f"{kind}/{name}")
        elif (current["metadata"].get("annotations") or {}).get(ANN_CREATE_ONLY) == "true":
            out.live[key] = current
        elif our_entries(current, "Update"):
            await adopt_fields(kube, current)
            out.live[key] = await kube.apply(stamped(obj))
            out.updated.append(f"{kind}/{name}")
        elif (current["metadata"].get("annotations") or {}).get(ANN_HASH) != content_hash(obj):
            out.live[key] = await kube.apply(stamped(obj))
            out.updated.append(f"{kind}/{name}")
        elif (where := drifted(stamped(obj), current)) is not None:
            out.live[key] = await kube.apply(stamped(obj))
            out.repaired.append(f"{kind}/{name}: {where}")
        else:
            out.live[key] = current
    for name in existing.keys() - want.keys():
        await kube.delete(api_version, kind, namespace, name)
        out.deleted.append(f"{kind}/{name}")
    return out


async def get_or_none(kube: Kube, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return await kube.get(api_version, kind, namespace, name)
    except NotFound:
        return None
