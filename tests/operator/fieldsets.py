"""Server-side apply field ownership, as a real API server keeps it in `metadata.managedFields`.

A field set is a set of paths; a path is a tuple of FieldsV1 keys: `f:<field>` for a map key and
`k:{"name":...}` for an item of a list keyed by name (containers, env, volumes, ports ...). Other lists are
atomic: one leaf. Facts reproduced (captured in shared/k8s-real/03a, 03b, Kubernetes 1.36):
- entries are keyed by (manager, operation): a POST or PATCH by manager M is an `Update` entry, an apply by
  M is an `Apply` entry, and the two are different owners;
- an apply prunes only the fields that M's `Apply` entry owned and the new configuration leaves out, and
  only where no other entry owns them too (so a field from M's own POST survives);
- an apply that changes a field another entry owns is a 409 Conflict unless `force=true`, which moves the
  ownership to the applier.
"""

from __future__ import annotations

import copy
import json
from typing import Any

Path = tuple[str, ...]
# Metadata fields a client sets and managedFields tracks; the rest is the server's.
TRACKED_META = ("labels", "annotations", "ownerReferences", "finalizers")


def _item_key(item: dict[str, Any]) -> str:
    return "k:" + json.dumps({"name": item["name"]}, separators=(",", ":"))


def _keyed(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in value)


def _walk(value: Any, prefix: Path, out: set[Path]) -> None:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            _walk(sub, (*prefix, f"f:{key}"), out)
    elif isinstance(value, list) and _keyed(value):
        for item in value:
            path = (*prefix, _item_key(item))
            out.add(path)
            _walk({k: v for k, v in item.items()}, path, out)
    else:
        out.add(prefix)


def fields_of(obj: dict[str, Any]) -> set[Path]:
    """Every path `obj` sets, as a manager sending it would own them (identity and status left out)."""
    out: set[Path] = set()
    meta = obj.get("metadata") or {}
    for key in TRACKED_META:
        if key in meta:
            _walk(meta[key], ("f:metadata", f"f:{key}"), out)
    for key, value in obj.items():
        if key not in ("apiVersion", "kind", "metadata", "status"):
            _walk(value, (f"f:{key}",), out)
    return out


def get(obj: Any, path: Path) -> Any:
    """The value at `path`, or a sentinel string when absent."""
    for step in path:
        kind, _, key = step.partition(":")
        if kind == "f" and isinstance(obj, dict) and key in obj:
            obj = obj[key]
        elif kind == "k" and isinstance(obj, list):
            name = json.loads(key)["name"]
            found = [i for i in obj if isinstance(i, dict) and i.get("name") == name]
            if not found:
                return "<absent>"
            obj = found[0]
        else:
            return "<absent>"
    return obj


def remove(obj: Any, path: Path) -> None:
    """Delete what `path` names, if it is there."""
    *head, last = path
    parent = obj
    for step in head:
        parent = get(parent, (step,))
        if parent == "<absent>":
            return
    kind, _, key = last.partition(":")
    if kind == "f" and isinstance(parent, dict):
        parent.pop(key, None)
    elif kind == "k" and isinstance(parent, list):
        name = json.loads(key)["name"]
        parent[:] = [i for i in parent if not (isinstance(i, dict) and i.get("name") == name)]


def merge(live: Any, applied: Any) -> Any:
    """`applied` laid over `live`: maps merge by key, name-keyed lists by name, anything else is replaced."""
    if isinstance(live, dict) and isinstance(applied, dict):
        out = copy.deepcopy(live)
        for key, value in applied.items():
            out[key] = merge(live.get(key), value) if key in live else copy.deepcopy(value)
        return out
    if isinstance(live, list) and isinstance(applied, list) and _keyed(applied) and _keyed(live):
        by_name = {i["name"]: i for i in live}
        out_list = [merge(by_name.get(i["name"]), i) if i["name"] in by_name else copy.deepcopy(i) for i in applied]
        applied_names = {i["name"] for i in applied}
        return out_list + [copy.deepcopy(i) for i in live if i["name"] not in applied_names]
    return copy.deepcopy(applied)


def to_fields_v1(paths: set[Path]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in sorted(paths):
        node = tree
        for step in path:
            node = node.setdefault(step, {})
    # A path that is both owned and a parent of owned paths carries the "." marker, as FieldsV1 does.
    for path in paths:
        node = tree
        for step in path:
            node = node[step]
        if node and "." not in node:
            node["."] = {}
    return tree


def from_fields_v1(tree: dict[str, Any], prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for key, sub in tree.items():
        if key == ".":
            out.add(prefix)
            continue
        path = (*prefix, key)
        if not sub:
            out.add(path)
        else:
            out |= from_fields_v1(sub, path)
    return out


def entries(obj: dict[str, Any]) -> dict[tuple[str, str], set[Path]]:
    """managedFields as {(manager, operation): paths}, status-subresource entries left out."""
    out: dict[tuple[str, str], set[Path]] = {}
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        if not entry or entry.get("subresource"):
            continue
        out[(entry["manager"], entry["operation"])] = from_fields_v1(entry.get("fieldsV1") or {})
    return out


def store(obj: dict[str, Any], owners: dict[tuple[str, str], set[Path]], api_version: str, now: str) -> None:
    managed = [
        {
            "manager": manager,
            "operation": operation,
            "apiVersion": api_version,
            "time": now,
            "fieldsType": "FieldsV1",
            "fieldsV1": to_fields_v1(paths),
        }
        for (manager, operation), paths in owners.items()
        if paths
    ]
    if managed:
        obj.setdefault("metadata", {})["managedFields"] = managed
    else:
        obj.get("metadata", {}).pop("managedFields", None)


def conflict_message(conflicts: list[tuple[str, Path]], api_version: str) -> tuple[str, list[dict[str, str]]]:
    """kube-apiserver's 409 text for an apply that would change fields other managers own."""

    def dotted(path: Path) -> str:
        parts = []
        for step in path:
            kind, _, key = step.partition(":")
            if kind == "f":
                parts.append(f".{key}")
            else:
                parts.append("[" + ",".join(f'{k}="{v}"' for k, v in json.loads(key).items()) + "]")
        return "".join(parts)

    causes = [
        {
            "reason": "FieldManagerConflict",
            "message": f'conflict with "{manager}" using {api_version}',
            "field": dotted(path),
        }
        for manager, path in conflicts
    ]
    head = f"Apply failed with {len(causes)} conflict{'s' if len(causes) != 1 else ''}: "
    return head + "; ".join(f"{c['message']}: {c['field']}" for c in causes), causes


def on_update(
    owners: dict[tuple[str, str], set[Path]], manager: str, old: dict[str, Any] | None, new: dict[str, Any]
) -> None:
    """An Update (POST, PUT, merge/JSON patch) by `manager`: it owns what it changed, others lose it."""
    new_fields = fields_of(new)
    changed = {p for p in new_fields if old is None or get(old, p) != get(new, p)}
    for key, paths in owners.items():
        paths &= new_fields  # fields that are gone are owned by nobody
        if key != (manager, "Update"):
            paths -= changed
    owners.setdefault((manager, "Update"), set()).update(changed)


def on_apply(
    owners: dict[tuple[str, str], set[Path]],
    manager: str,
    live: dict[str, Any],
    applied: dict[str, Any],
    force: bool,
) -> tuple[dict[str, Any], list[tuple[str, Path]]]:
    """A server-side apply by `manager`: (the new object, conflicts). With conflicts and no force nothing
    changes; the caller answers 409."""
    applied_fields = fields_of(applied)
    conflicts = [
        (key[0], path)
        for key, paths in owners.items()
        if key != (manager, "Apply")
        for path in sorted(paths & applied_fields)
        # A keyed list item is a presence marker: only its leaves can conflict.
        if not isinstance(get(applied, path), dict) and get(live, path) != get(applied, path)
    ]
    if conflicts and not force:
        return live, conflicts
    for key, paths in owners.items():
        if key != (manager, "Apply"):
            paths -= {p for _, p in conflicts}
    body = {k: v for k, v in applied.items() if k not in ("status",)}
    result = merge(live, {k: v for k, v in body.items() if k != "metadata"})
    for key in TRACKED_META:
        if key in (applied.get("metadata") or {}):
            result["metadata"][key] = merge(live["metadata"].get(key), applied["metadata"][key])
    previously = owners.get((manager, "Apply"), set())
    others = set().union(*(p for k, p in owners.items() if k != (manager, "Apply")))
    for path in sorted(previously - applied_fields, key=len):
        # Another owner of this field, or of a field beneath it, keeps it alive.
        if path in others or any(o[: len(path)] == path for o in others):
            continue
        remove(result, path)
    owners[(manager, "Apply")] = applied_fields
    return result, []
