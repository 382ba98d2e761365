"""A small async Kubernetes REST client over aiohttp, configured from the kubernetes client's Configuration.

The operator writes generic manifests (dicts) of a few known kinds; the typed client would convert and
validate every object and block the event loop. Credentials come from kubernetes.config (in-cluster
or kubeconfig, exec plugins included); the bearer token is asked for on each request so it refreshes.
"""

from __future__ import annotations

import json
import ssl
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
        token = self._cfg.get_api_key_with_prefix("authorization") or self._cfg.get_api_key_with_prefix("BearerToken")
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
        params = {"labelSelector": label_selector} if label_selector else None
        result = await self.request("GET", path(api_version, kind, namespace), params=params)
        return list(result.get("items") or [])

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return await self.request(
            "POST",
            path(obj["apiVersion"], obj["kind"], meta.get("namespace")),
            params={"fieldManager": FIELD_MANAGER},
            body=obj,
        )

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply, forcing our field manager's ownership of the fields we set."""
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
