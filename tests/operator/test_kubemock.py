"""The Kubernetes API mock reproduces what a real API server does (captured in shared/k8s-real/).

One test per captured fact, named after it, against the mock over real HTTP. The captured responses are
read where they are at hand (shared/k8s-real beside the checkout) and compared field by field; the facts
themselves are restated here so the tests also run where shared/ is absent.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import kubernetes
import pytest
from kubemock import ApiServer, declare

pytestmark = pytest.mark.kmock(cls=ApiServer)

NS = "og"
REAL = pathlib.Path(__file__).resolve().parents[3] / "shared" / "k8s-real"


def captured(name: str) -> dict[str, Any] | None:
    path = REAL / name
    return json.loads(path.read_text()) if path.exists() else None


async def call(
    kmock: ApiServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    content_type: str = "application/json",
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    hdrs = {"Content-Type": content_type, **(headers or {})}
    data = json.dumps(body) if body is not None else None
    async with kmock.request(method, path, data=data, headers=hdrs, params=params or {}) as resp:
        return resp.status, await resp.json(content_type=None)


def service(name: str, labels: dict[str, str], selector: dict[str, str] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"ports": [{"name": "http", "port": 8080}]}
    if selector:
        spec["selector"] = selector
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels}, "spec": spec}


def deployment(name: str, env: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "ollama-guard-operator"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [
                        {
                            "name": "proxy",
                            "image": "busybox:1.36",
                            "env": [{"name": k, "value": v} for k, v in env.items()],
                        }
                    ]
                },
            },
        },
    }


DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NS}/deployments"
SERVICES = f"/api/v1/namespaces/{NS}/services"
SLICES = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
APPLY = "application/apply-patch+yaml"
MANAGER = {"fieldManager": "ollama-guard-operator"}


def env_of(obj: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in obj["spec"]["template"]["spec"]["containers"][0]["env"]}


# -- 1 ---------------------------------------------------------------------------------------------------


async def test_list_items_carry_no_apiversion_or_kind_but_a_get_does(kmock: ApiServer) -> None:
    declare(kmock)
    status, _ = await call(kmock, "POST", SERVICES, service("guard", {"a": "b"}, {"app": "guard"}))
    assert status == 201
    _, listed = await call(kmock, "GET", SERVICES)
    assert listed["kind"] == "ServiceList" and listed["apiVersion"] == "v1"
    assert listed["items"] and all("apiVersion" not in i and "kind" not in i for i in listed["items"])
    _, got = await call(kmock, "GET", f"{SERVICES}/guard")
    assert got["apiVersion"] == "v1" and got["kind"] == "Service"
    real = captured("01-list-services-raw.json")
    if real is not None:
        assert all("kind" not in i and "apiVersion" not in i for i in real["items"])
        assert set(listed) >= {"kind", "apiVersion", "metadata", "items"} == set(real)


# -- 2 ---------------------------------------------------------------------------------------------------


async def test_controller_endpointslices_copy_the_service_labels(kmock: ApiServer) -> None:
    declare(kmock)
    labels = {
        "app.kubernetes.io/managed-by": "ollama-guard-operator",
        "ollama-guard.io/guardproxy": "guard",
        "app.kubernetes.io/name": "ollama-guard",
    }
    await call(kmock, "POST", SERVICES, service("guard", labels, {"app": "guard"}))
    await call(kmock, "POST", SERVICES, service("guard-scan", labels, None))
    _, listed = await call(kmock, "GET", SLICES, params={"labelSelector": "ollama-guard.io/guardproxy=guard"})
    (slice_,) = listed["items"]  # the selector-less Service gets none
    got = slice_["metadata"]["labels"]
    assert got == {
        **labels,
        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
        "kubernetes.io/service-name": "guard",
    }
    assert slice_["metadata"]["name"].startswith("guard-") and slice_["metadata"]["generateName"] == "guard-"
    owner = slice_["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "Service" and owner["name"] == "guard" and owner["controller"] is True
    _, only_ours = await call(
        kmock, "GET", SLICES, params={"labelSelector": "endpointslice.kubernetes.io/managed-by=ollama-guard-operator"}
    )
    assert only_ours["items"] == []
    real = captured("02-list-endpointslices-selector-guardproxy-raw.json")
    if real is not None:
        controller = [
            i
            for i in real["items"]
            if i["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
        ]
        assert set(controller[0]["metadata"]["labels"]) == set(got)
    # Deleted, the controller makes it anew (the outage a careless operator causes).
    await call(kmock, "DELETE", f"{SLICES}/{slice_['metadata']['name']}")
    _, again = await call(kmock, "GET", SLICES, params={"labelSelector": "kubernetes.io/service-name=guard"})
    assert len(again["items"]) == 1 and again["items"][0]["metadata"]["name"] != slice_["metadata"]["name"]


# -- 3 ---------------------------------------------------------------------------------------------------


async def test_apply_does_not_prune_fields_a_post_by_the_same_manager_set(kmock: ApiServer) -> None:
    declare(kmock)
    status, created = await call(
        kmock, "POST", DEPLOYMENTS, deployment("fm-post", {"OG_A": "1", "OG_B": "2", "OG_C": "3"}), params=MANAGER
    )
    assert status == 201
    assert [(e["manager"], e["operation"]) for e in created["metadata"]["managedFields"]] == [
        ("ollama-guard-operator", "Update")
    ]
    status, applied = await call(
        kmock,
        "PATCH",
        f"{DEPLOYMENTS}/fm-post",
        deployment("fm-post", {"OG_A": "1", "OG_C": "3"}),
        content_type=APPLY,
        params=MANAGER,
    )
    assert status == 200
    assert env_of(applied) == {"OG_A": "1", "OG_B": "2", "OG_C": "3"}  # OG_B survives
    assert {(e["manager"], e["operation"]) for e in applied["metadata"]["managedFields"]} == {
        ("ollama-guard-operator", "Apply"),
        ("ollama-guard-operator", "Update"),
    }
    # Changing a field the Update entry owns, unforced: 409 naming it.
    status, conflict = await call(
        kmock,
        "PATCH",
        f"{DEPLOYMENTS}/fm-post",
        deployment("fm-post", {"OG_A": "1", "OG_C": "changed"}),
        content_type=APPLY,
        params=MANAGER,
    )
    assert status == 409 and conflict["reason"] == "Conflict"
    assert (
        conflict["details"]["causes"][0]["field"]
        == '.spec.template.spec.containers[name="proxy"].env[name="OG_C"].value'
    )
    real = captured("03a-step4-ssa-change-OG_C-409-conflict.json")
    if real is not None:
        assert conflict["message"] == real["message"]
        assert conflict["details"]["causes"] == real["details"]["causes"]


async def test_apply_prunes_what_its_own_apply_entry_owned(kmock: ApiServer) -> None:
    declare(kmock)
    status, _ = await call(
        kmock,
        "PATCH",
        f"{DEPLOYMENTS}/fm-ssa",
        deployment("fm-ssa", {"OG_A": "1", "OG_B": "2", "OG_C": "3"}),
        content_type=APPLY,
        params={**MANAGER, "force": "true"},
    )
    assert status == 201
    _, after = await call(
        kmock,
        "PATCH",
        f"{DEPLOYMENTS}/fm-ssa",
        deployment("fm-ssa", {"OG_A": "1", "OG_C": "3"}),
        content_type=APPLY,
        params={**MANAGER, "force": "true"},
    )
    assert env_of(after) == {"OG_A": "1", "OG_C": "3"}
    assert [(e["manager"], e["operation"]) for e in after["metadata"]["managedFields"]] == [
        ("ollama-guard-operator", "Apply")
    ]
    real = captured("03b-step3-get-raw-after.json")
    if real is not None:
        assert [e["name"] for e in real["spec"]["template"]["spec"]["containers"][0]["env"]] == ["OG_A", "OG_C"]


async def test_a_write_that_sets_managed_fields_replaces_them(kmock: ApiServer) -> None:
    """Kubernetes docs, "Server-Side Apply: clearing managedFields": a write that sets managedFields
    explicitly is taken as given, so an operator can drop an old Update entry of its own."""
    declare(kmock)
    _, created = await call(kmock, "POST", DEPLOYMENTS, deployment("fm", {"OG_A": "1"}), params=MANAGER)
    status, cleared = await call(
        kmock,
        "PATCH",
        f"{DEPLOYMENTS}/fm",
        [{"op": "replace", "path": "/metadata/managedFields", "value": [{}]}],
        content_type="application/json-patch+json",
        params=MANAGER,
    )
    assert status == 200 and "managedFields" not in cleared["metadata"]
    assert created["metadata"]["managedFields"]


# -- 4 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addresses", "address_type", "capture"),
    [
        (["127.0.0.1"], "IPv4", "04-response-422-loopback-v4.json"),
        (["169.254.1.1"], "IPv4", "04-response-422-linklocal-v4.json"),
        (["::1"], "IPv6", "04-response-422-loopback-v6.json"),
        (["10.250.0.2", "127.0.0.1", "169.254.169.254"], "IPv4", "04-response-422-mixed-v4.json"),
    ],
    ids=["loopback-v4", "link-local-v4", "loopback-v6", "mixed"],
)
async def test_endpointslice_addresses_in_loopback_or_link_local_ranges_are_422(
    kmock: ApiServer, addresses: list[str], address_type: str, capture: str
) -> None:
    declare(kmock)
    body = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "bad", "labels": {"kubernetes.io/service-name": "guard-scan"}},
        "addressType": address_type,
        "ports": [{"name": "http", "port": 11434, "protocol": "TCP"}],
        "endpoints": [{"addresses": addresses, "conditions": {"ready": True}}],
    }
    status, answer = await call(kmock, "POST", SLICES, body)
    assert status == 422 and answer["reason"] == "Invalid" and answer["kind"] == "Status"
    bad = [a for a in addresses if a != "10.250.0.2"]
    assert [c["field"] for c in answer["details"]["causes"]] == [
        f"endpoints[0].addresses[{addresses.index(a)}]" for a in bad
    ]
    _, listed = await call(kmock, "GET", SLICES)
    assert listed["items"] == []  # refused whole
    real = captured(capture)
    if real is not None:
        assert answer["details"]["causes"] == real["details"]["causes"]
        assert answer["message"].split(" is invalid: ")[1] == real["message"].split(" is invalid: ")[1]


# -- 5 ---------------------------------------------------------------------------------------------------


async def test_bearer_tokens_authenticate_and_anything_else_is_anonymous_or_401(kmock: ApiServer) -> None:
    declare(kmock)
    kmock.tokens = {"t0k3n": "system:serviceaccount:og:operator"}
    cases = {
        "Bearer t0k3n": 200,
        "bearer t0k3n": 200,  # the scheme is case-insensitive
        "t0k3n": 403,  # a bare token is anonymous, not 401
        "Bearer Bearer t0k3n": 401,
        "Bearer wrong": 401,
        None: 403,
    }
    for header, want in cases.items():
        status, body = await call(kmock, "GET", SERVICES, headers={"Authorization": header} if header else {})
        assert status == want, (header, body)
    real = captured("05-authorization-header-variants.json")
    if real is not None:
        assert "403" in json.dumps(real) and "401" in json.dumps(real)


def test_the_kubernetes_client_keeps_a_kubeconfig_token_under_bearertoken(tmp_path: pathlib.Path) -> None:
    """Fact 5, the client side: kubernetes' loader stores the token as api_key["BearerToken"], already
    prefixed, and nothing under "authorization"."""
    (tmp_path / "token").write_text("abc")
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "abc"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    (tmp_path / "config").write_text(json.dumps(kubeconfig))
    cfg = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(tmp_path / "config"), client_configuration=cfg)
    assert cfg.api_key == {"BearerToken": "Bearer abc"} or cfg.api_key.get("BearerToken") == "Bearer abc"
    assert "authorization" not in cfg.api_key
    real = captured("05-python-client-api-key.json")
    if real is not None:
        seen = real["load_kube_config(token user)"]
        assert seen["api_key_keys"] == ["BearerToken"] and seen["get_api_key_with_prefix('authorization')"] is None
        assert real["load_incluster_config (InClusterConfigLoader.load_and_set)"]["api_key_keys"] == ["BearerToken"]


# -- 6 ---------------------------------------------------------------------------------------------------


async def test_status_writes_keep_spec_and_main_writes_keep_status(kmock: ApiServer) -> None:
    declare(kmock)
    path = f"/apis/ollama-guard.io/v1alpha1/namespaces/{NS}/guardproxies"
    body = {
        "apiVersion": "ollama-guard.io/v1alpha1",
        "kind": "GuardProxy",
        "metadata": {"name": "guard"},
        "spec": {"upstream": {"url": "http://a:11434"}},
    }
    await call(kmock, "POST", path, body)
    merge = "application/merge-patch+json"
    _, st = await call(
        kmock,
        "PATCH",
        f"{path}/guard/status",
        {"spec": {"upstream": {"url": "http://b:11434"}}, "status": {"observedGeneration": 1}},
        content_type=merge,
    )
    assert st["spec"]["upstream"]["url"] == "http://a:11434" and st["status"] == {"observedGeneration": 1}
    assert st["metadata"]["generation"] == 1
    _, main = await call(
        kmock,
        "PATCH",
        f"{path}/guard",
        {"spec": {"upstream": {"url": "http://c:11434"}}, "status": {"observedGeneration": 9}},
        content_type=merge,
    )
    assert main["spec"]["upstream"]["url"] == "http://c:11434" and main["status"] == {"observedGeneration": 1}
    assert main["metadata"]["generation"] == 2


# -- 7 ---------------------------------------------------------------------------------------------------


async def test_namespace_deletion_waits_for_finalized_objects_and_refuses_creates(kmock: ApiServer) -> None:
    declare(kmock)
    path = f"/apis/ollama-guard.io/v1alpha1/namespaces/{NS}/guardproxies"
    body = {
        "apiVersion": "ollama-guard.io/v1alpha1",
        "kind": "GuardProxy",
        "metadata": {"name": "guard", "finalizers": ["ollama-guard.io/operator"]},
        "spec": {},
    }
    await call(kmock, "POST", path, body)
    await call(kmock, "POST", SERVICES, service("other", {}, None))
    status, _ = await call(kmock, "DELETE", f"/api/v1/namespaces/{NS}")
    assert status == 200
    _, ns = await call(kmock, "GET", f"/api/v1/namespaces/{NS}")
    assert ns["status"]["phase"] == "Terminating"
    assert "ollama-guard.io/operator" in ns["status"]["conditions"][0]["message"]
    _, gp = await call(kmock, "GET", f"{path}/guard")
    assert gp["metadata"]["deletionTimestamp"] and gp["metadata"]["finalizers"]
    status, _ = await call(kmock, "GET", f"{SERVICES}/other")
    assert status == 404  # everything without a finalizer is gone
    status, refused = await call(kmock, "POST", SERVICES, service("late", {}, None))
    assert status == 403 and refused["details"]["causes"][0]["reason"] == "NamespaceTerminating"
    real = captured("07-create-in-terminating-namespace-403.json")
    if real is not None:
        assert refused["details"]["causes"][0] == {
            **real["details"]["causes"][0],
            "message": f"namespace {NS} is being terminated",
        }
    await call(
        kmock,
        "PATCH",
        f"{path}/guard",
        {"metadata": {"finalizers": None}},
        content_type="application/merge-patch+json",
    )
    status, _ = await call(kmock, "GET", f"/api/v1/namespaces/{NS}")
    assert status == 404
