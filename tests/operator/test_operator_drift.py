"""Drift: a child whose fields were edited by hand is re-applied; what the API server adds is not drift.

Pure tests of `apply.drifted` and of `apply_kind` over a fake client, then the drift timer in-process
against kmock (the helpers and the way kopf is run come from test_operator_handlers.py).
"""

from __future__ import annotations

import base64
import copy
import os
from typing import Any

import pytest

os.environ.setdefault("OLLAMA_GUARD_OPERATOR_PROBE_SECONDS", "0.2")
os.environ.setdefault("OLLAMA_GUARD_OPERATOR_DRIFT_SECONDS", "0.5")

from kubemock import ApiServer, declare  # noqa: E402
from ollama_guard_operator import builders  # noqa: E402
from ollama_guard_operator.apply import ANN_HASH, apply_kind, drifted, stamped  # noqa: E402
from ollama_guard_operator.builders import Capabilities, NodeEndpoint, Owner  # noqa: E402
from ollama_guard_operator.spec import parse_guardproxy, parse_scannode  # noqa: E402
from test_operator_handlers import (  # noqa: E402
    GP,
    NS,
    SPEC,
    assert_settled,
    create,
    eventually,
    gp_status,
    handled,
    objects,
    running_operator,
)

OWNER = Owner(name="guard", namespace="ai", uid="0b1c2d3e-0000-4000-8000-000000000001")
UPSTREAM = {"upstream": {"url": "http://ollama.ai.svc:11434"}}
SPECS = [
    {},
    {
        "variants": {
            "cuda": {"enabled": True, "autoscaling": {"enabled": True, "maxReplicas": 3}},
            "cpu": {"replicas": 3, "podAntiAffinity": "required"},
        },
        "auth": {"apiKeysSecret": {"name": "keys"}, "adminTokenSecret": {"name": "admin"}},
    },
    {
        "redis": {"mode": "disabled"},
        "models": {"persistentVolumeClaim": "weights", "readOnly": False},
        "service": {"type": "LoadBalancer", "port": 80},
    },
    {"variants": {"cpu": {"replicas": 1, "resources": {"requests": {"cpu": "250m", "memory": "1024Mi"}}}}},
]
NODES = [
    NodeEndpoint("mini-1", parse_scannode({"guardProxy": "guard", "address": "192.168.1.20"})),
    NodeEndpoint("mini-2", parse_scannode({"guardProxy": "guard", "address": "mini2.lan", "port": 9000})),
]
CANONICAL = {"1000m": "1", "1024Mi": "1Gi", "2048Mi": "2Gi", "0.5": "500m"}


def desired(spec: dict[str, Any], caps: Capabilities | None = None) -> dict[str, dict[str, Any]]:
    objs = builders.desired(
        OWNER,
        parse_guardproxy({**UPSTREAM, **spec}),
        caps or Capabilities(custom_metrics=True, service_monitors=True),
        redis_password="pw",  # noqa: S106 - a test value
        nodes=NODES,
    )
    return {f"{o['kind']}/{o['metadata']['name']}": stamped(o) for o in objs}


def _omitempty(value: Any) -> Any:
    """Drop what Go's omitempty drops: false, 0, "", empty maps and lists (but keep `emptyDir: {}`)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            v = _omitempty(v)
            if v is False or v == "" or (isinstance(v, int) and not isinstance(v, bool) and v == 0):
                continue
            if v in ({}, []) and k not in ("emptyDir",):
                continue
            out[k] = v
        return out
    if isinstance(value, list):
        return [_omitempty(v) for v in value]
    return value


def _canonical_quantities(value: Any, parent: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _canonical_quantities(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical_quantities(v, parent) for v in value]
    if parent in ("cpu", "memory", "storage", "nvidia.com/gpu", "sizeLimit", "averageValue"):
        return CANONICAL.get(str(value), str(value))
    return value


def served(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` as a real API server returns it: defaults and bookkeeping added, values canonicalised."""
    live = _canonical_quantities(_omitempty(copy.deepcopy(obj)))
    meta = live["metadata"]
    meta.update(uid="u-1", resourceVersion="42", generation=3, creationTimestamp="2025-01-01T00:00:00Z")
    meta["managedFields"] = [{"manager": "ollama-guard-operator", "operation": "Apply"}]
    meta.setdefault("annotations", {})["deployment.kubernetes.io/revision"] = "3"
    live["status"] = {"observedGeneration": 3, "replicas": 1}
    if "stringData" in live:
        live["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in live.pop("stringData").items()}
    spec = live.get("spec") or {}
    if live["kind"] == "Service":
        spec.setdefault("clusterIP", "10.0.0.7")
        spec.update(clusterIPs=[spec["clusterIP"]], sessionAffinity="None")
        for port in spec["ports"]:
            port.setdefault("targetPort", port["port"])
    if "template" in spec:
        spec.setdefault("progressDeadlineSeconds", 600)
        pod = spec["template"]["spec"]
        pod.update(dnsPolicy="ClusterFirst", restartPolicy="Always", schedulerName="default-scheduler")
        for c in pod["containers"]:
            c.update(terminationMessagePath="/dev/termination-log", terminationMessagePolicy="File")
            c.setdefault("imagePullPolicy", "IfNotPresent")
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if probe in c:
                    c[probe].setdefault("successThreshold", 1)
                    c[probe].get("httpGet", {}).setdefault("scheme", "HTTP")
        for v in pod.get("volumes") or []:
            if "configMap" in v or "secret" in v:
                (v.get("configMap") or v.get("secret"))["defaultMode"] = 420
    return live


# -- pure: what is not drift -------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=["defaults", "cuda-hpa-auth", "no-redis-pvc", "small"])
def test_every_child_as_the_server_returns_it_is_not_drift(spec: dict[str, Any]) -> None:
    for key, obj in desired(spec).items():
        assert drifted(obj, served(obj)) is None, key
        assert drifted(obj, copy.deepcopy(obj)) is None, key


def test_quantities_compare_by_value_where_quantities_live() -> None:
    want = {"resources": {"requests": {"cpu": "1000m", "memory": "1024Mi"}, "limits": {"nvidia.com/gpu": 1}}}
    live = {"resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"nvidia.com/gpu": "1"}}}
    assert drifted(want, live) is None
    assert drifted({"emptyDir": {"sizeLimit": "1024Mi"}}, {"emptyDir": {"sizeLimit": "1Gi"}}) is None
    hpa_target = {"target": {"type": "AverageValue", "averageValue": "500m"}}
    assert drifted(hpa_target, {"target": {"type": "AverageValue", "averageValue": "0.5"}}) is None
    live["resources"]["requests"]["memory"] = "2Gi"
    assert drifted(want, live) == "resources.requests.memory"
    # Elsewhere a string is a string: an env value "1000m" is not "1".
    assert drifted({"env": [{"name": "X", "value": "1000m"}]}, {"env": [{"name": "X", "value": "1"}]}) == (
        "env[X].value"
    )


def test_ports_as_int_or_string_and_empty_as_absent() -> None:
    assert drifted({"targetPort": 8080}, {"targetPort": "8080"}) is None
    assert drifted({"port": "8080"}, {"port": 8080}) is None
    assert drifted({"targetPort": "http"}, {"targetPort": 8080}) == "targetPort"
    want = {"a": "", "b": {}, "c": [], "d": False, "e": 0, "f": None, "g": {"h": None}}
    assert drifted(want, {}) is None
    assert drifted(want, {"a": None, "b": None}) is None
    assert drifted({"readOnly": True}, {}) == "readOnly"
    assert drifted({"automountServiceAccountToken": False}, {"automountServiceAccountToken": True}) == (
        "automountServiceAccountToken"
    )
    assert drifted({"replicas": 1}, {"replicas": True}) == "replicas"  # a bool is not an int


def test_extra_keys_and_named_items_added_by_others_are_not_drift() -> None:
    obj = desired({})["Deployment/guard-cpu"]
    live = served(obj)
    pod = live["spec"]["template"]["spec"]
    live["spec"]["template"]["metadata"].setdefault("annotations", {})["kubectl.kubernetes.io/restartedAt"] = "now"
    pod["containers"].insert(0, {"name": "istio-proxy", "image": "istio/proxyv2"})  # injected sidecar
    pod["containers"][1]["env"].reverse()  # order of named items does not matter
    pod["containers"][1]["env"].append({"name": "DEBUG", "value": "1"})
    pod["volumes"].append({"name": "istio-envoy", "emptyDir": {}})
    assert drifted(obj, live) is None


# -- pure: what is drift, and where ------------------------------------------------------------


def _edit(key: str, spec: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    obj = desired(spec or {})[key]
    return obj, served(obj)


def test_an_edited_image_is_drift() -> None:
    obj, live = _edit("Deployment/guard-cpu")
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "evil/proxy:latest"
    assert drifted(obj, live) == "spec.template.spec.containers[proxy].image"


def test_an_edited_or_removed_env_var_is_drift() -> None:
    obj, live = _edit("Deployment/guard-cpu")
    env = live["spec"]["template"]["spec"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "OLLAMA_URL")["value"] = "http://elsewhere:11434"
    assert drifted(obj, live) == "spec.template.spec.containers[proxy].env[OLLAMA_URL].value"
    env[:] = [e for e in env if e["name"] != "OLLAMA_URL"]
    assert drifted(obj, live) == "spec.template.spec.containers[proxy].env[OLLAMA_URL]"


def test_edited_replicas_are_drift_unless_an_hpa_owns_them() -> None:
    obj, live = _edit("Deployment/guard-cpu")
    live["spec"]["replicas"] = 7
    assert drifted(obj, live) == "spec.replicas"
    spec = {"variants": {"cuda": {"enabled": True, "autoscaling": {"enabled": True, "maxReplicas": 3}}}}
    obj, live = _edit("Deployment/guard-cuda", spec)
    live["spec"]["replicas"] = 3  # the HPA scaled it
    assert drifted(obj, live) is None


def test_an_edited_service_port_is_drift() -> None:
    obj, live = _edit("Service/guard")
    live["spec"]["ports"][0]["port"] = 9999
    assert drifted(obj, live) == "spec.ports[http].port"


def test_an_edited_redis_memory_limit_is_drift() -> None:
    obj, live = _edit("StatefulSet/guard-redis")
    live["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "8Gi"
    assert drifted(obj, live) == "spec.template.spec.containers[redis].resources.limits.memory"


def test_positional_lists_compare_length_and_order() -> None:
    obj, live = _edit("StatefulSet/guard-redis")
    args = live["spec"]["template"]["spec"]["containers"][0]["args"]
    args.append("--protected-mode")
    assert drifted(obj, live) == "spec.template.spec.containers[redis].args[12]"
    args[:] = args[:4]
    assert drifted(obj, live) == "spec.template.spec.containers[redis].args[4]"


def test_hash_annotation_and_labels_are_compared() -> None:
    obj, live = _edit("ConfigMap/guard-config")
    live["metadata"]["annotations"][ANN_HASH] = "0" * 32
    assert drifted(obj, live) == 'metadata.annotations["ollama-guard.io/applied-hash"]'
    obj, live = _edit("ConfigMap/guard-config")
    live["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "someone"
    assert drifted(obj, live) == 'metadata.labels["app.kubernetes.io/managed-by"]'
    obj, live = _edit("ConfigMap/guard-config")
    live["data"]["config.yaml"] = "input_scanners: {}\n"
    assert drifted(obj, live) == 'data["config.yaml"]'


def test_secret_string_data_matches_the_served_data() -> None:
    obj, live = _edit("Secret/guard-redis")
    assert "stringData" not in live and drifted(obj, live) is None
    live["data"]["password"] = base64.b64encode(b"other").decode()
    assert drifted(obj, live) == "data.password"


# -- apply_kind over a fake client -------------------------------------------------------------


class FakeKube:
    def __init__(self, objs: list[dict[str, Any]]) -> None:
        self.objs = {o["metadata"]["name"]: o for o in objs}
        self.writes: list[tuple[str, str]] = []

    async def list(self, api_version: str, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for o in self.objs.values() if o["kind"] == kind]

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(("create", obj["metadata"]["name"]))
        self.objs[obj["metadata"]["name"]] = served(obj)
        return self.objs[obj["metadata"]["name"]]

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(("apply", obj["metadata"]["name"]))
        self.objs[obj["metadata"]["name"]] = served(obj)
        return self.objs[obj["metadata"]["name"]]

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self.writes.append(("delete", name))
        self.objs.pop(name, None)


async def _apply_deployments(kube: FakeKube, want: list[dict[str, Any]]) -> Any:
    selector = builders.owned_selector(OWNER)
    return await apply_kind(kube, "apps/v1", "Deployment", "ai", selector, want)  # type: ignore[arg-type]


async def test_apply_kind_repairs_drift_and_otherwise_writes_nothing() -> None:
    objs = builders.desired(OWNER, parse_guardproxy(UPSTREAM), Capabilities(), redis_password="pw")  # noqa: S106
    want = [o for o in objs if o["kind"] == "Deployment"]
    kube = FakeKube([served(stamped(o)) for o in want])
    out = await _apply_deployments(kube, want)
    assert kube.writes == [] and not out.changed

    kube.objs["guard-cpu"]["spec"]["template"]["spec"]["containers"][0]["image"] = "evil/proxy:latest"
    out = await _apply_deployments(kube, want)
    assert kube.writes == [("apply", "guard-cpu")]
    assert out.repaired == ["Deployment/guard-cpu: spec.template.spec.containers[proxy].image"]
    assert out.updated == [] and out.changed
    assert drifted(stamped(want[0]), kube.objs["guard-cpu"]) is None

    kube.writes.clear()
    out = await _apply_deployments(kube, want)
    assert kube.writes == [] and not out.changed

    # A changed GuardProxy (new hash) is an update, not a repair.
    changed = copy.deepcopy(want)
    changed[0]["spec"]["revisionHistoryLimit"] = 5
    out = await _apply_deployments(kube, changed)
    assert out.updated == ["Deployment/guard-cpu"] and out.repaired == []


async def test_create_only_children_are_never_repaired() -> None:
    objs = builders.desired(OWNER, parse_guardproxy(UPSTREAM), Capabilities(), redis_password="pw")  # noqa: S106
    secret = next(o for o in objs if o["kind"] == "Secret")
    live = served(stamped(secret))
    live["data"]["password"] = base64.b64encode(b"rotated-by-hand").decode()
    kube = FakeKube([live])
    out = await apply_kind(kube, "v1", "Secret", "ai", builders.owned_selector(OWNER), [secret])  # type: ignore[arg-type]
    assert kube.writes == [] and not out.changed


# -- the drift timer, in-process against kmock -------------------------------------------------

DEPLOYMENT = f"/apis/apps/v1/namespaces/{NS}/deployments/guard-cpu"


def _image(kmock: ApiServer) -> str:
    return objects(kmock, "apps/v1/deployments")["guard-cpu"]["spec"]["template"]["spec"]["containers"][0]["image"]


def _events(kmock: ApiServer, reason: str) -> list[str]:
    return [e.get("message", "") for e in objects(kmock, "v1/events").values() if e.get("reason") == reason]


@pytest.mark.kmock(cls=ApiServer)
async def test_drift_timer_reverts_a_hand_edited_image_then_writes_nothing(kmock: ApiServer) -> None:
    declare(kmock)
    async with running_operator(kmock):
        await create(kmock, GP, "guard", SPEC)
        await eventually(lambda: gp_status(kmock).get("observedGeneration") == 1, "first reconcile")
        await eventually(lambda: handled(kmock), "kopf's handling cycle done")
        image = _image(kmock)

        # A user edits the image in place (as `kubectl set image` would), leaving the hash annotation alone.
        ops = [{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "evil/proxy:latest"}]
        async with kmock.patch(DEPLOYMENT, json=ops, headers={"Content-Type": "application/json-patch+json"}) as resp:
            assert resp.status == 200, await resp.text()
        assert _image(kmock) == "evil/proxy:latest"

        await eventually(lambda: _image(kmock) == image, "the drift timer restores the image")
        repaired = await eventually(lambda: _events(kmock, "DriftRepaired"), "a DriftRepaired event")
        assert repaired == ["repaired drift in Deployment/guard-cpu: spec.template.spec.containers[proxy].image"]

        # Settled again: further timer passes over an unedited object write nothing.
        await assert_settled(kmock)
        assert _image(kmock) == image
