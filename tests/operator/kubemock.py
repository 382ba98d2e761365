"""A kmock KubernetesEmulator that behaves enough like an API server for kopf and our operator.

kmock 0.8 stores objects but leaves out what a real server adds; this subclass fills those gaps:
server-set uid/resourceVersion/generation/creationTimestamp, generateName, label selectors on lists,
server-side apply (approximated: the applied fields replace ours, status kept), the status subresource
(a /status patch changes only status; a main patch never does), merge and JSON patches, deletion with
finalizers, and owner-reference garbage collection. Every write is logged in `writes` for assertions.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import json
import secrets
import uuid
from typing import Any

import aiohttp.web
import jsonpatch
from kmock._internal import dicts, enums, k8s, references, rendering

RESOURCES: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    # "group/version/plural": (kind, namespaced, subresources)
    "v1/configmaps": ("ConfigMap", True, ()),
    "v1/secrets": ("Secret", True, ()),
    "v1/services": ("Service", True, ()),
    "v1/events": ("Event", True, ()),
    "v1/namespaces": ("Namespace", False, ()),
    "apps/v1/deployments": ("Deployment", True, ("status",)),
    "apps/v1/statefulsets": ("StatefulSet", True, ("status",)),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True, ("status",)),
    "autoscaling/v2/horizontalpodautoscalers": ("HorizontalPodAutoscaler", True, ("status",)),
    "batch/v1/jobs": ("Job", True, ("status",)),
    "discovery.k8s.io/v1/endpointslices": ("EndpointSlice", True, ()),
    "ollama-guard.io/v1alpha1/guardproxies": ("GuardProxy", True, ("status",)),
    "ollama-guard.io/v1alpha1/scannodes": ("ScanNode", True, ("status",)),
}
OPTIONAL = {
    "monitoring.coreos.com/v1/servicemonitors": ("ServiceMonitor", True, ()),
    "custom.metrics.k8s.io/v1beta1/pods": ("MetricValueList", True, ()),
}
WRITES = {enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE}
_rv = itertools.count(1000)


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def declare(emulator: k8s.KubernetesEmulator, *, monitoring: bool = False, custom_metrics: bool = False) -> None:
    table = dict(RESOURCES)
    if monitoring:
        table["monitoring.coreos.com/v1/servicemonitors"] = OPTIONAL["monitoring.coreos.com/v1/servicemonitors"]
    if custom_metrics:
        table["custom.metrics.k8s.io/v1beta1/pods"] = OPTIONAL["custom.metrics.k8s.io/v1beta1/pods"]
    for key, (kind, namespaced, subs) in table.items():
        emulator.resources[key] = references.ResourceInfo(
            kind=kind,
            namespaced=namespaced,
            subresources=set(subs),
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
        )


def _labels_match(obj: dict[str, Any], selector: str | None) -> bool:
    if not selector:
        return True
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in selector.split(","):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key.rstrip("=")) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class ApiServer(k8s.KubernetesEmulator):
    """Write requests are served here in full; reads (get, list, watch, discovery) by kmock."""

    writes: list[tuple[str, str]]
    log: list[tuple[str, str]]

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.writes = []
        self.bodies: list[Any] = []
        self.log = []

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        self.log.append((str(request.method), request.url.path))
        if request.resource is not None and request.action in WRITES:
            self.writes.append((str(request.method), request.url.path))
            self.bodies.append(request.data)
            try:
                async with self._lock:
                    code, payload = await self._write(request)
            except k8s.KubernetesError as exc:
                return await self._render_error(exc)
            return aiohttp.web.json_response(payload, status=code)
        return await super()._handle(request)

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        result = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        result["items"] = [o for o in result["items"] if _labels_match(o, selector)]
        result["metadata"] = {"resourceVersion": str(next(_rv))}
        return result

    # -- writes ------------------------------------------------------------------------------------

    async def _emit(self, resource: references.resource, type_: str, raw: dict[str, Any]) -> None:
        await self._buses[resource].put({"type": type_, "object": copy.deepcopy(raw)})

    def _key(self, request: rendering.Request, name: str | None) -> tuple[Any, str | None, str]:
        return (request.resource, request.namespace, name)

    def _live(self, key: tuple[Any, str | None, str]) -> dict[str, Any] | None:
        if key in self._objects and not self._objects[key].deleted:
            return copy.deepcopy(self._objects[key].raw)
        return None

    async def _store(self, key: Any, obj: dict[str, Any], type_: str) -> None:
        if key in self._objects and not self._objects[key].deleted:
            self._objects[key].history.append(self._objects[key].last.__class__(obj))
        elif key in self._objects:
            self._objects[key].create(obj)
        else:
            self._objects[key] = obj
        await self._emit(key[0], type_, obj)

    async def _create(self, request: rendering.Request, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)
        if not meta.get("name"):
            raise k8s.KubernetesError(status=422, reason="Invalid", message="metadata.name is required")
        key = self._key(request, meta["name"])
        if self._live(key) is not None:
            raise k8s.KubernetesObjectConflictError()
        if request.namespace:
            meta["namespace"] = request.namespace
        meta.update(uid=str(uuid.uuid4()), resourceVersion=str(next(_rv)), generation=1, creationTimestamp=_now())
        await self._store(key, obj, "ADDED")
        return 201, obj

    async def _write(self, request: rendering.Request) -> tuple[int, dict[str, Any]]:
        if request.action == enums.action.CREATE:
            return await self._create(request, request.data or {})
        key = self._key(request, request.name)
        old = self._live(key)
        content_type = (request.headers.get("Content-Type") or "").split(";")[0]

        if request.action == enums.action.DELETE:
            if old is None:
                raise k8s.KubernetesObjectNotFoundError()
            if old["metadata"].get("finalizers"):
                if not old["metadata"].get("deletionTimestamp"):
                    old["metadata"]["deletionTimestamp"] = _now()
                    old["metadata"]["resourceVersion"] = str(next(_rv))
                    await self._store(key, old, "MODIFIED")
                return 200, old
            await self._delete(key, old)
            return 200, old

        # PATCH
        if old is None:
            if content_type == "application/apply-patch+yaml":
                return await self._create(request, request.data or {})
            raise k8s.KubernetesObjectNotFoundError()
        body = request.data
        if content_type == "application/json-patch+json":
            try:
                new = jsonpatch.apply_patch(old, body)
            except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPatchConflict) as exc:
                raise k8s.KubernetesError(status=422, reason="Invalid", message=str(exc)) from None
        elif content_type == "application/apply-patch+yaml":
            new = copy.deepcopy(old)
            for field, value in body.items():
                if field not in ("metadata", "status", "apiVersion", "kind"):
                    new[field] = copy.deepcopy(value)
            for field in ("labels", "annotations", "ownerReferences"):
                if field in body.get("metadata", {}):
                    new["metadata"][field] = copy.deepcopy(body["metadata"][field])
        else:
            new = dicts.patch_dict(copy.deepcopy(old), body or {})

        if request.subresource == "status":
            result = copy.deepcopy(old)
            if "status" in new:
                result["status"] = new["status"]
        else:
            result = new
            if "status" in old:
                result["status"] = old["status"]
            else:
                result.pop("status", None)
        for f in ("uid", "creationTimestamp", "generation", "namespace", "name"):
            if f in old["metadata"]:
                result["metadata"][f] = old["metadata"][f]
        if _spec_of(result) != _spec_of(old):
            result["metadata"]["generation"] = int(old["metadata"].get("generation") or 1) + 1
        if result == old:
            return 200, old  # a real server writes nothing for a no-op patch
        result["metadata"]["resourceVersion"] = str(next(_rv))
        if result["metadata"].get("deletionTimestamp") and not result["metadata"].get("finalizers"):
            await self._delete(key, result)
            return 200, result
        await self._store(key, result, "MODIFIED")
        return 200, result

    async def _delete(self, key: Any, obj: dict[str, Any]) -> None:
        self._objects[key].delete()
        await self._emit(key[0], "DELETED", obj)
        # Garbage collection: children whose owner is gone go too.
        uid = obj["metadata"].get("uid")
        for ckey, child in list(self._objects.items()):
            if child.deleted:
                continue
            refs = child.raw.get("metadata", {}).get("ownerReferences") or []
            if any(r.get("uid") == uid for r in refs):
                await self._delete(ckey, copy.deepcopy(child.raw))


def _spec_of(obj: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in obj.items() if k not in ("metadata", "status")}, sort_keys=True)
