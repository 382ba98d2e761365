"""The operator against a real cluster (whatever KUBECONFIG names). Skipped when none is reachable.

Asserts on what the operator controls: children, owner references, status, EndpointSlices. Pods are
checked only where the cluster can run them (it has a schedulable node), so an API server with
controllers but no nodes passes too. The CRDs are applied from operator/ollama_guard_operator/crds.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes")
kopf = pytest.importorskip("kopf")

pytestmark = pytest.mark.cluster

from ollama_guard_operator.inprocess import running_operator  # noqa: E402

CRDS = pathlib.Path(__file__).resolve().parents[1] / "operator" / "ollama_guard_operator" / "crds"
DEADLINE = 60.0


def _reachable() -> kubernetes.client.Configuration | None:
    cfg = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_kube_config(client_configuration=cfg)
    except Exception:  # noqa: BLE001 - any failure means "no cluster here"
        return None
    api = kubernetes.client.VersionApi(kubernetes.client.ApiClient(cfg))
    try:
        api.get_code(_request_timeout=3)
    except Exception:  # noqa: BLE001
        return None
    return cfg


@pytest.fixture(scope="module")
def cluster() -> kubernetes.client.Configuration:
    cfg = _reachable()
    if cfg is None:
        pytest.skip("no Kubernetes cluster reachable via KUBECONFIG")
    client = kubernetes.client.ApiClient(cfg)
    ext = kubernetes.client.ApiextensionsV1Api(client)
    for path in sorted(CRDS.glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        try:
            ext.create_custom_resource_definition(body)
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise
    for path in sorted(CRDS.glob("*.yaml")):
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        for _ in range(60):
            crd = ext.read_custom_resource_definition(name)
            if any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or []):
                break
            time.sleep(0.5)  # noqa: ASYNC251 - sync fixture polling the API with a deadline
    return cfg


@pytest.fixture
def namespace(cluster: Any) -> Any:
    core = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(cluster))
    name = f"og-e2e-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def _can_run_pods(cfg: Any) -> bool:
    nodes = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(cfg)).list_node().items
    return any(not n.spec.unschedulable for n in nodes)


async def eventually(check: Callable[[], Any], what: str, within: float = DEADLINE) -> Any:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while True:
        try:
            value = await asyncio.to_thread(check)
        except kubernetes.client.ApiException:
            value = None
        if value:
            return value
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.5)


async def test_guardproxy_children_and_status(cluster: Any, namespace: str) -> None:
    client = kubernetes.client.ApiClient(cluster)
    custom = kubernetes.client.CustomObjectsApi(client)
    apps = kubernetes.client.AppsV1Api(client)
    core = kubernetes.client.CoreV1Api(client)
    body = {
        "apiVersion": "ollama-guard.io/v1alpha1",
        "kind": "GuardProxy",
        "metadata": {"name": "guard", "namespace": namespace},
        "spec": {"upstream": {"url": "http://ollama.example:11434"}},
    }
    async with running_operator(cluster, [namespace], DEADLINE):
        await asyncio.to_thread(
            custom.create_namespaced_custom_object,
            "ollama-guard.io",
            "v1alpha1",
            namespace,
            "guardproxies",
            body,
        )

        def gp() -> dict:
            return custom.get_namespaced_custom_object(
                "ollama-guard.io", "v1alpha1", namespace, "guardproxies", "guard"
            )

        status = await eventually(
            lambda: (gp().get("status") or {}).get("observedGeneration") == 1 and gp()["status"],
            "status observed",
        )
        assert status["serviceURL"] == f"http://guard.{namespace}.svc:8080"
        assert {c["type"] for c in status["conditions"]} >= {"Ready", "Progressing", "Degraded", "Monitoring"}
        dep = await asyncio.to_thread(apps.read_namespaced_deployment, "guard-cpu", namespace)
        assert dep.metadata.owner_references[0].uid == gp()["metadata"]["uid"]
        assert dep.spec.template.spec.containers[0].security_context.read_only_root_filesystem
        await asyncio.to_thread(apps.read_namespaced_stateful_set, "guard-redis", namespace)
        svc = await asyncio.to_thread(core.read_namespaced_service, "guard", namespace)
        assert svc.spec.selector == {
            "app.kubernetes.io/instance": "guard",
            "app.kubernetes.io/component": "proxy",
        }

        # Redis to disabled: the operator prunes the StatefulSet.
        await asyncio.to_thread(
            custom.patch_namespaced_custom_object,
            "ollama-guard.io",
            "v1alpha1",
            namespace,
            "guardproxies",
            "guard",
            {"spec": {"redis": {"mode": "disabled"}}},
            _content_type="application/merge-patch+json",
        )

        def sts_gone() -> bool:
            try:
                apps.read_namespaced_stateful_set("guard-redis", namespace)
            except kubernetes.client.ApiException as exc:
                return exc.status == 404
            return False

        await eventually(sts_gone, "managed Redis removed")

        if await asyncio.to_thread(_can_run_pods, cluster):
            # Pods run here: the Deployment's pods at least get scheduled (the image may still be pulling).
            await eventually(
                lambda: core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/instance=guard").items,
                "proxy pods exist",
            )
