"""A kmock KubernetesEmulator that behaves like a real API server where our operator depends on it.

kmock 0.8 stores objects but leaves out what a real server adds; this subclass fills those gaps:
server-set uid/resourceVersion/generation/creationTimestamp, generateName, label selectors on lists,
merge and JSON patches, deletion with finalizers, and owner-reference garbage collection. Every write is
logged in `writes` for assertions.

Each behaviour below was captured from a real kube-apiserver (Kubernetes 1.36, `shared/k8s-real/`, section
numbers refer to its README) and has a test named after it in test_kubemock.py:
1. LIST items carry no apiVersion/kind (only the list does); a GET has both.
2. The EndpointSlice controller makes a slice for every Service with a selector, carrying the Service's
   labels plus `endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io` and
   `kubernetes.io/service-name`; it makes a new one when that slice is deleted.
3. Field ownership (`managedFields`, see fieldsets.py): POST/PATCH are `Update` entries, server-side apply
   an `Apply` entry of the same manager name; apply prunes only what its own Apply entry owned; an apply
   that changes another entry's field is a 409 unless forced.
4. EndpointSlice addresses in 127.0.0.0/8, ::1, 169.254.0.0/16 or fe80::/10 are refused with a 422 Status.
5. With `tokens` set: `Authorization: Bearer <token>` (scheme in any case) authenticates; an unknown
   token is 401; no header or a bare token is `system:anonymous` and gets 403.
6. The status subresource: a /status write keeps spec, a main write keeps status; only spec bumps
   `metadata.generation`.
7. Deleting a namespace deletes what has no finalizer and marks the rest with deletionTimestamp; the
   namespace stays Terminating until they are gone, and creates in it are 403.
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
import itertools
import json
import re
import secrets
import uuid
from typing import Any

import aiohttp.web
import fieldsets
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
    # Bearer tokens the server accepts, with the user each authenticates as; empty: no authentication.
    tokens: dict[str, str]

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.writes = []
        self.bodies: list[Any] = []
        self.log = []
        self.tokens = {}
        self.users: list[str] = []  # who each request was served as, in order
        self.terminating: set[str] = set()
        self.namespaces_gone: set[str] = set()

    # -- authentication (fact 5) ---------------------------------------------------------------------

    def _authenticate(self, request: rendering.Request) -> aiohttp.web.StreamResponse | None:
        if not self.tokens:
            return None
        header = next((v for k, v in request.headers.items() if k.lower() == "authorization"), "")
        scheme, _, credential = header.partition(" ")
        if header and scheme.lower() == "bearer" and credential:
            user = self.tokens.get(credential)
            if user is None:
                return _status(401, "Unauthorized", "Unauthorized")
        else:
            user = "system:anonymous"  # no header, or a bare token: anonymous, not 401
        self.users.append(user)
        if user == "system:anonymous" and request.url.path not in ("/version", "/healthz", "/livez", "/readyz"):
            return _status(
                403, "Forbidden", f'forbidden: User "{user}" cannot {request.method.value.lower()} {request.url.path}'
            )
        return None

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        self.log.append((str(request.method), request.url.path))
        denied = self._authenticate(request)
        if denied is not None:
            return denied
        ns_path = _namespace_path(request.url.path)
        if ns_path is not None:
            return await self._namespace(request, ns_path)
        if request.resource is not None and request.action in WRITES:
            self.writes.append((str(request.method), request.url.path))
            self.bodies.append(request.data)
            try:
                async with self._lock:
                    code, payload = await self._write(request)
            except k8s.KubernetesError as exc:
                return await self._render_error(exc)
            return aiohttp.web.json_response(payload, status=code)
        response = await super()._handle(request)
        if request.action == enums.action.FETCH and request.resource is not None:
            return await self._with_type(request, response)
        return response

    async def _with_type(self, request: rendering.Request, response: Any) -> Any:
        """A GET of one object names its apiVersion and kind, even when the stored object lacks them."""
        if not isinstance(response, aiohttp.web.Response) or response.status != 200 or not response.body:
            return response
        obj = json.loads(response.body)
        group_version = "/".join(p for p in (request.resource.group, request.resource.version) if p)
        info = self.resources.get(f"{group_version}/{request.resource.plural}")
        if info is not None:
            obj.setdefault("apiVersion", group_version)
            obj.setdefault("kind", info.kind)
        return aiohttp.web.json_response(obj, status=200)

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        result = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        # Fact 1: the list names its kind; its items carry neither apiVersion nor kind.
        items = []
        for obj in result["items"]:
            if not _labels_match(obj, selector):
                continue
            item = copy.deepcopy(obj)
            item.pop("apiVersion", None)
            item.pop("kind", None)
            items.append(item)
        group_version = "/".join(p for p in (request.resource.group, request.resource.version) if p)
        info = self.resources.get(f"{group_version}/{request.resource.plural}")
        return {
            "kind": f"{info.kind if info else 'Object'}List",
            "apiVersion": group_version,
            "metadata": {"resourceVersion": str(next(_rv))},
            "items": items,
        }

    # -- namespaces (fact 7) -------------------------------------------------------------------------

    async def _namespace(self, request: rendering.Request, name: str) -> aiohttp.web.StreamResponse:
        if name in self.namespaces_gone:
            return _status(404, "NotFound", f'namespaces "{name}" not found')
        if request.method == "DELETE":
            self.writes.append(("DELETE", request.url.path))
            async with self._lock:
                self.terminating.add(name)
                for key, obj in list(self._objects.items()):
                    if obj.deleted or key[1] != name:
                        continue
                    raw = copy.deepcopy(obj.raw)
                    if raw["metadata"].get("finalizers"):
                        if not raw["metadata"].get("deletionTimestamp"):
                            raw["metadata"]["deletionTimestamp"] = _now()
                            raw["metadata"]["resourceVersion"] = str(next(_rv))
                            await self._store(key, raw, "MODIFIED")
                    else:
                        await self._delete(key, raw)
                self._finish_namespaces()
            return aiohttp.web.json_response(self._namespace_object(name), status=200)
        return aiohttp.web.json_response(self._namespace_object(name), status=200)

    def _namespace_object(self, name: str) -> dict[str, Any]:
        phase = "Terminating" if name in self.terminating else "Active"
        obj: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": phase},
        }
        if phase == "Terminating":
            left = sorted(
                {
                    fin
                    for (_, ns, _), o in self._objects.items()
                    if ns == name and not o.deleted
                    for fin in o.raw["metadata"].get("finalizers") or []
                }
            )
            obj["status"]["conditions"] = [
                {
                    "type": "NamespaceFinalizersRemaining",
                    "status": "True" if left else "False",
                    "reason": "SomeFinalizersRemain" if left else "ContentHasNoFinalizers",
                    "message": f"Some content in the namespace has finalizers remaining: {', '.join(left)}"
                    if left
                    else "All content-preserving finalizers finished",
                }
            ]
        return obj

    def _finish_namespaces(self) -> None:
        for name in list(self.terminating):
            if not any(ns == name and not o.deleted for (_, ns, _), o in self._objects.items()):
                self.terminating.discard(name)
                self.namespaces_gone.add(name)

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
        if _plural(key[0]) == "services":
            await self._endpointslice_controller(key[1], self._objects[key].raw)

    def _manager(self, request: rendering.Request) -> str:
        return request.params.get("fieldManager") or "unknown"

    async def _create(
        self, request: rendering.Request, body: dict[str, Any], *, apply: bool = False
    ) -> tuple[int, dict[str, Any]]:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if request.namespace in self.terminating:
            raise _forbidden_terminating(request, meta.get("name") or "")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)
        if not meta.get("name"):
            raise k8s.KubernetesError(status=422, reason="Invalid", message="metadata.name is required")
        key = self._key(request, meta["name"])
        if self._live(key) is not None:
            raise k8s.KubernetesObjectConflictError()
        _validate(request, obj)
        if request.namespace:
            meta["namespace"] = request.namespace
        owners: dict[tuple[str, str], set[fieldsets.Path]] = {}
        if apply:
            fieldsets.on_apply(owners, self._manager(request), {"metadata": {}}, obj, True)
        else:
            fieldsets.on_update(owners, self._manager(request), None, obj)
        fieldsets.store(obj, owners, _api_version(request), _now())
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
        apply = content_type == "application/apply-patch+yaml"
        if old is None:
            if apply:
                return await self._create(request, request.data or {}, apply=True)
            raise k8s.KubernetesObjectNotFoundError()
        body = request.data
        owners = fieldsets.entries(old)
        explicit_managed_fields = False
        if content_type == "application/json-patch+json":
            try:
                new = jsonpatch.apply_patch(old, body)
            except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPatchConflict) as exc:
                raise k8s.KubernetesError(status=422, reason="Invalid", message=str(exc)) from None
        elif apply:
            new, conflicts = fieldsets.on_apply(
                owners, self._manager(request), old, body, request.params.get("force") == "true"
            )
            if conflicts:
                message, causes = fieldsets.conflict_message(conflicts, _api_version(request))
                raise k8s.KubernetesError(status=409, reason="Conflict", message=message, details={"causes": causes})
        else:
            new = dicts.patch_dict(copy.deepcopy(old), body or {})
        if not apply and request.subresource != "status":
            if new["metadata"].get("managedFields") != old["metadata"].get("managedFields"):
                # A write that sets managedFields itself is taken as given ([{}] clears them).
                explicit_managed_fields = True
            else:
                fieldsets.on_update(owners, self._manager(request), old, new)

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
            if explicit_managed_fields:
                result["metadata"]["managedFields"] = [
                    e for e in result["metadata"].get("managedFields") or [] if e and e.get("manager")
                ]
                if not result["metadata"]["managedFields"]:
                    del result["metadata"]["managedFields"]
            else:
                fieldsets.store(result, owners, _api_version(request), _now())
        for f in ("uid", "creationTimestamp", "generation", "namespace", "name"):
            if f in old["metadata"]:
                result["metadata"][f] = old["metadata"][f]
        if _spec_of(result) != _spec_of(old):
            result["metadata"]["generation"] = int(old["metadata"].get("generation") or 1) + 1
        if _without_times(result) == _without_times(old):
            return 200, old  # a real server writes nothing for a no-op patch
        _validate(request, result)
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
        if _plural(key[0]) == "endpointslices":
            await self._endpointslice_controller(key[1], None)
        self._finish_namespaces()

    # -- the EndpointSlice controller (fact 2) -------------------------------------------------------

    async def _endpointslice_controller(self, namespace: str | None, changed: dict[str, Any] | None) -> None:
        """Every Service with a selector has one controller-made slice with its labels; a deleted one is
        made anew (under a new generated name), as kube-controller-manager does."""
        services = [
            o.raw
            for (res, ns, _), o in self._objects.items()
            if ns == namespace and _plural(res) == "services" and not o.deleted
        ]
        slice_res = next((res for (res, _, _) in self._objects if _plural(res) == "endpointslices"), None)
        slice_res = slice_res or references.resource("discovery.k8s.io", "v1", "endpointslices")
        for svc in services:
            if not (svc.get("spec") or {}).get("selector"):
                continue
            name = svc["metadata"]["name"]
            labels = {
                **(svc["metadata"].get("labels") or {}),
                "endpointslice.kubernetes.io/managed-by": CONTROLLER_MANAGER,
                "kubernetes.io/service-name": name,
            }
            mine = [
                (k, o)
                for k, o in self._objects.items()
                if k[0] == slice_res
                and k[1] == namespace
                and not o.deleted
                and (o.raw["metadata"].get("labels") or {}).get("endpointslice.kubernetes.io/managed-by")
                == CONTROLLER_MANAGER
                and (o.raw["metadata"].get("labels") or {}).get("kubernetes.io/service-name") == name
            ]
            if mine:
                (key, obj), *_ = mine
                if obj.raw["metadata"].get("labels") != labels:
                    raw = copy.deepcopy(obj.raw)
                    raw["metadata"]["labels"] = labels
                    raw["metadata"]["resourceVersion"] = str(next(_rv))
                    self._objects[key].history.append(self._objects[key].last.__class__(raw))
                    await self._emit(slice_res, "MODIFIED", raw)
                continue
            slice_name = f"{name}-{secrets.token_hex(3)[:5]}"
            raw = {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": slice_name,
                    "generateName": f"{name}-",
                    "namespace": namespace,
                    "uid": str(uuid.uuid4()),
                    "resourceVersion": str(next(_rv)),
                    "generation": 1,
                    "creationTimestamp": _now(),
                    "labels": labels,
                    "ownerReferences": [
                        {
                            "apiVersion": "v1",
                            "kind": "Service",
                            "name": name,
                            "uid": svc["metadata"]["uid"],
                            "controller": True,
                            "blockOwnerDeletion": True,
                        }
                    ],
                },
                "addressType": "IPv4",
                "ports": [
                    {"name": p.get("name", ""), "port": p.get("targetPort", p["port"]), "protocol": "TCP"}
                    for p in (svc.get("spec") or {}).get("ports") or []
                ],
            }
            key = (slice_res, namespace, slice_name)
            self._objects[key] = raw
            await self._emit(slice_res, "ADDED", raw)


CONTROLLER_MANAGER = "endpointslice-controller.k8s.io"
_NS_PATH = re.compile(r"^/api/v1/namespaces/([a-z0-9-]+)$")


def _namespace_path(path: str) -> str | None:
    m = _NS_PATH.match(path)
    return m.group(1) if m else None


def _plural(resource: Any) -> str:
    return str(getattr(resource, "plural", "") or "")


def _api_version(request: rendering.Request) -> str:
    return "/".join(p for p in (request.resource.group, request.resource.version) if p)


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message}
    body.update(reason=reason, code=code)
    return aiohttp.web.json_response(body, status=code)


def _forbidden_terminating(request: rendering.Request, name: str) -> k8s.KubernetesError:
    ns = request.namespace
    return k8s.KubernetesError(
        status=403,
        reason="Forbidden",
        message=f'{_plural(request.resource)} "{name}" is forbidden: unable to create new content in namespace '
        f"{ns} because it is being terminated",
        details={
            "name": name,
            "kind": _plural(request.resource),
            "causes": [
                {
                    "reason": "NamespaceTerminating",
                    "message": f"namespace {ns} is being terminated",
                    "field": "metadata.namespace",
                }
            ],
        },
    )


def _validate(request: rendering.Request, obj: dict[str, Any]) -> None:
    """Fact 4: EndpointSlice addresses in the loopback or link-local ranges are refused, the slice whole."""
    if _plural(request.resource) != "endpointslices":
        return
    causes = []
    for i, ep in enumerate(obj.get("endpoints") or []):
        for j, address in enumerate(ep.get("addresses") or []):
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                continue
            if ip.is_loopback:
                why = "may not be in the loopback range (127.0.0.0/8, ::1/128)"
            elif ip.is_link_local:
                why = "may not be in the link-local range (169.254.0.0/16, fe80::/10)"
            else:
                continue
            causes.append(
                {
                    "reason": "FieldValueInvalid",
                    "message": f'Invalid value: "{address}": {why}',
                    "field": f"endpoints[{i}].addresses[{j}]",
                }
            )
    if causes:
        name = obj["metadata"].get("name", "")
        listed = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
        listed = f"[{listed}]" if len(causes) > 1 else listed  # Go's field.ErrorList brackets only a list
        raise k8s.KubernetesError(
            status=422,
            reason="Invalid",
            message=f'EndpointSlice.discovery.k8s.io "{name}" is invalid: {listed}',
            details={"name": name, "group": "discovery.k8s.io", "kind": "EndpointSlice", "causes": causes},
        )


def _without_times(obj: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    for entry in out.get("metadata", {}).get("managedFields") or []:
        entry.pop("time", None)
    return out


def _spec_of(obj: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in obj.items() if k not in ("metadata", "status")}, sort_keys=True)
