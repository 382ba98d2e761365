"""A small async Kubernetes REST client over aiohttp, configured from the kubernetes client's Configuration.

The operator writes generic manifests (dicts) of a few known kinds; the typed client would convert and
validate every object and block the event loop. Credentials come from kubernetes.config (in-cluster
or kubeconfig, exec plugins included); the bearer token is asked for on each request so it refreshes.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Sequence
from typing import Any

import aiohttp
import kubernetes

FIELD_MANAGER = "ollama-guard-operator"

# apiVersion, kind -> plural, namespaced
KINDS: dict[tuple[str, str], tuple[str, bool]] = {
    ("v1", "ConfigMap"): ("configmaps", True),
    ("v1", "Secret"): ("secrets", True),
    ("v1", "Service"): ("services", True),
    ("v1", "Event"): ("events", True),
    ("apps/v1", "Deployment"): ("deployments", True),
    ("apps/v1", "StatefulSet"): ("statefulsets", True),
    ("policy/v1", "PodDisruptionBudget"): ("poddisruptionbudgets", True),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("horizontalpodautoscalers", True),
    ("batch/v1", "Job"): ("jobs", True),
    ("discovery.k8s.io/v1", "EndpointSlice"): ("endpointslices", True),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("servicemonitors", True),
    ("ollama-guard.io/v1alpha1", "GuardProxy"): ("guardproxies", True),
    ("ollama-guard.io/v1alpha1", "ScanNode"): ("scannodes", True),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class NotFound(ApiError):
    pass


def path(api_version: str, kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
    plural, namespaced = KINDS[(api_version, kind)]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [base]
    if namespaced and namespace:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name:
        parts.append(name)
    if sub:
        parts.append(sub)
    return "/".join(parts)


def bearer_token(cfg: kubernetes.client.Configuration) -> str | None:
    """The `Authorization` header value for `cfg`'s token, or None when it authenticates otherwise.

    kubernetes' loaders (kubeconfig `token:`, exec plugins, the in-cluster ServiceAccount) keep the token
    under api_key["BearerToken"], already prefixed ("Bearer <t>", or "bearer <t>" in-cluster), and
    refresh it through the hook that get_api_key_with_prefix calls; a hand-built configuration may use
    "authorization" instead (captured: shared/k8s-real/05-python-client-api-key.json). A token file read
    verbatim may end in a newline, which no header may carry.
    """
    for key in ("BearerToken", "authorization"):
        value = cfg.get_api_key_with_prefix(key)
        if value:
            value = str(value).strip()
            scheme, _, credential = value.partition(" ")
            return value if credential.strip() else f"Bearer {scheme}"
    return None


def load_configuration() -> kubernetes.client.Configuration:
    """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    cfg = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=cfg)
    return cfg


class Kube:
    """Async JSON requests to the API server; one aiohttp session per instance."""

    def __init__(self, configuration: kubernetes.client.Configuration, *, timeout: float = 30.0) -> None:
        self._cfg = configuration
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._locks: dict[tuple[str, ...], asyncio.Lock] = {}

    def lock(self, key: tuple[str, ...]) -> asyncio.Lock:
        """A lock for writers of one set of objects through this client (its event loop, its lifetime)."""
        return self._locks.setdefault(key, asyncio.Lock())

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self._cfg.host.startswith("https"):
            return False
        if not self._cfg.verify_ssl:
            return False
        ctx = ssl.create_default_context(cafile=self._cfg.ssl_ca_cert)
        if self._cfg.cert_file:
            ctx.load_cert_chain(self._cfg.cert_file, self._cfg.key_file)
        return ctx

    async def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl()), timeout=self._timeout
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        url_path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"Accept": "application/json"}
        token = bearer_token(self._cfg)
        if token:
            headers["Authorization"] = token
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        sess = await self._sess()
        async with sess.request(
            method, self._cfg.host.rstrip("/") + url_path, params=params, data=data, headers=headers
        ) as resp:
            text = await resp.text()
            if resp.status == 404:
                raise NotFound(404, text[:500])
            if resp.status >= 400:
                try:
                    message = json.loads(text).get("message", text)
                except ValueError:
                    message = text
                raise ApiError(resp.status, str(message)[:1000])
            return json.loads(text) if text else None

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        return await self.request("GET", path(api_version, kind, namespace, name))

    async def list(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        """The items of a LIST, each with its apiVersion and kind filled in: a real API server sends those
        on the list only, never on its items (shared/k8s-real/01-list-*-raw.json)."""
        params = {"labelSelector": label_selector} if label_selector else None
        result = await self.request("GET", path(api_version, kind, namespace), params=params)
        items = list(result.get("items") or [])
        for item in items:
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return items

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """POST: 409 when the object exists already (for objects that must never be overwritten)."""
        meta = obj["metadata"]
        return await self.request(
            "POST",
            path(obj["apiVersion"], obj["kind"], meta.get("namespace")),
            params={"fieldManager": FIELD_MANAGER},
            body=obj,
        )

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply (creates the object when it is absent), forcing our field manager's ownership
        of the fields we set. Fields our last apply set and `obj` leaves out are removed."""
        meta = obj["metadata"]
        return await self.request(
            "PATCH",
            path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]),
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
            body=obj,
            content_type="application/apply-patch+yaml",
        )

    async def merge_patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        patch: dict[str, Any],
        sub: str | None = None,
    ) -> dict[str, Any]:
        return await self.request(
            "PATCH",
            path(api_version, kind, namespace, name, sub),
            body=patch,
            content_type="application/merge-patch+json",
        )

    async def json_patch(
        self, api_version: str, kind: str, namespace: str | None, name: str, ops: Sequence[dict[str, Any]]
    ) -> dict[str, Any]:
        return await self.request(
            "PATCH",
            path(api_version, kind, namespace, name),
            params={"fieldManager": FIELD_MANAGER},
            body=ops,
            content_type="application/json-patch+json",
        )

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        try:
            await self.request(
                "DELETE", path(api_version, kind, namespace, name), body={"propagationPolicy": "Background"}
            )
        except NotFound:
            pass

    async def api_groups(self) -> set[str]:
        """Names of the API groups the server serves (discovery)."""
        result = await self.request("GET", "/apis")
        return {g["name"] for g in result.get("groups", [])}
