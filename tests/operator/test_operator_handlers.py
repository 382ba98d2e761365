"""The operator, run in-process by kopf against a Kubernetes API emulation (kmock) on loopback.

No sleeps as synchronisation: every test waits for a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp.web
import kubernetes
import pytest

os.environ.setdefault("OLLAMA_GUARD_OPERATOR_PROBE_SECONDS", "0.2")
os.environ.setdefault("OLLAMA_GUARD_OPERATOR_DRIFT_SECONDS", "0.5")

from kubemock import ApiServer, declare  # noqa: E402
from ollama_guard_operator import inprocess  # noqa: E402

pytestmark = pytest.mark.kmock(cls=ApiServer)

GP = "ollama-guard.io/v1alpha1/guardproxies"
SN = "ollama-guard.io/v1alpha1/scannodes"
NS = "ai"
DEADLINE = 10.0
# The test's own calls authenticate as cluster admin where a test turns token authentication on.
ADMIN_TOKEN = "test-admin"  # noqa: S105 - a test credential
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def eventually(check: Callable[[], Any], what: str, within: float = DEADLINE) -> Any:
    """Poll `check` until it returns a truthy value; fail with `what` after the deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while True:
        try:
            value = check()
        except (KeyError, ValueError, TypeError, IndexError):
            value = None
        if value:
            return value
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


def timer_passes(kmock: ApiServer) -> int:
    """Drift-timer passes so far: each one lists the Deployments."""
    return len([p for m, p in kmock.log if p.endswith("/deployments") and "GET" in m])


async def assert_settled(kmock: ApiServer) -> None:
    """Once the next drift-timer pass is over, two more passes write nothing."""
    first = timer_passes(kmock)
    await eventually(lambda: timer_passes(kmock) >= first + 1, "a drift-timer pass")
    settled = len(kmock.writes)
    before = timer_passes(kmock)
    await eventually(lambda: timer_passes(kmock) >= before + 2, "two more drift-timer passes")
    assert kmock.writes[settled:] == [], kmock.bodies[settled:]


def _resource_key(res: Any) -> str:
    return "/".join(p for p in (res.group, res.version, res.plural) if p)


def objects(kmock: ApiServer, resource: str) -> dict[str, dict[str, Any]]:
    return {
        name: obj.raw
        for (res, ns, name), obj in kmock.objects.items()
        if _resource_key(res) == resource and ns == NS and not obj.deleted
    }


def handled(kmock: ApiServer, name: str = "guard") -> bool:
    """kopf has finished the object's handling cycle (it records the handled spec last)."""
    annotations = objects(kmock, GP)[name]["metadata"].get("annotations") or {}
    return "ollama-guard.io/last-handled" in annotations


def gp_status(kmock: ApiServer, name: str = "guard") -> dict[str, Any]:
    return objects(kmock, GP)[name].get("status") or {}


def condition(kmock: ApiServer, type_: str, name: str = "guard") -> dict[str, Any] | None:
    for c in gp_status(kmock, name).get("conditions") or []:
        if c["type"] == type_:
            return c
    return None


def running_operator(kmock: ApiServer) -> contextlib.AbstractAsyncContextManager[None]:
    cfg = kubernetes.client.Configuration()
    cfg.host = str(kmock.url).rstrip("/")
    # No graceful wait for timers: the mock server goes away with the test.
    return inprocess.running_operator(cfg, ready_within=DEADLINE, graceful=False)


async def create(kmock: ApiServer, resource: str, name: str, spec: dict[str, Any]) -> None:
    group_version, plural = resource.rsplit("/", 1)
    prefix = "/api" if "/" not in group_version else "/apis"
    kind = {"guardproxies": "GuardProxy", "scannodes": "ScanNode", "secrets": "Secret"}[plural]
    body = {"apiVersion": group_version, "kind": kind, "metadata": {"name": name, "namespace": NS}, **spec}
    async with kmock.post(f"{prefix}/{group_version}/namespaces/{NS}/{plural}", json=body, headers=ADMIN) as resp:
        assert resp.status == 201, await resp.text()


async def patch(kmock: ApiServer, resource: str, name: str, body: dict[str, Any]) -> None:
    async with kmock.patch(
        f"/apis/{resource.rsplit('/', 2)[0]}/{resource.rsplit('/', 2)[1]}/namespaces/{NS}/"
        f"{resource.rsplit('/', 1)[1]}/{name}",
        json=body,
        headers={"Content-Type": "application/merge-patch+json", **ADMIN},
    ) as resp:
        assert resp.status == 200, await resp.text()


async def delete(kmock: ApiServer, resource: str, name: str) -> None:
    async with kmock.delete(
        f"/apis/{resource.rsplit('/', 1)[0]}/namespaces/{NS}/{resource.rsplit('/', 1)[1]}/{name}", headers=ADMIN
    ) as resp:
        assert resp.status == 200, await resp.text()


SPEC = {"spec": {"upstream": {"url": "http://ollama.ai.svc:11434"}}}


def children(kmock: ApiServer) -> dict[str, set[str]]:
    kinds = {
        "deployments": "apps/v1/deployments",
        "statefulsets": "apps/v1/statefulsets",
        "services": "v1/services",
        "configmaps": "v1/configmaps",
        "secrets": "v1/secrets",
        "pdbs": "policy/v1/poddisruptionbudgets",
        "hpas": "autoscaling/v2/horizontalpodautoscalers",
        "slices": "discovery.k8s.io/v1/endpointslices",
        "servicemonitors": "monitoring.coreos.com/v1/servicemonitors",
    }
    return {k: set(objects(kmock, r)) for k, r in kinds.items()}


async def test_create_builds_children_and_reports_status(kmock: ApiServer) -> None:
    declare(kmock)
    async with running_operator(kmock):
        await create(kmock, GP, "guard", SPEC)
        await eventually(lambda: gp_status(kmock).get("observedGeneration") == 1, "status observed")
        got = children(kmock)
        assert got["deployments"] == {"guard-cpu"}
        assert got["statefulsets"] == {"guard-redis"}
        assert got["services"] == {"guard", "guard-redis"}
        assert got["configmaps"] == {"guard-config"} and got["secrets"] == {"guard-redis"}
        assert got["pdbs"] == {"guard-cpu"} and not got["hpas"]
        uid = objects(kmock, GP)["guard"]["metadata"]["uid"]
        dep = objects(kmock, "apps/v1/deployments")["guard-cpu"]
        assert dep["metadata"]["ownerReferences"][0]["uid"] == uid
        st = gp_status(kmock)
        assert st["serviceURL"] == "http://guard.ai.svc:8080"
        assert st["redis"] == {
            "mode": "managed",
            "state": "Pending",
            "url": "redis://guard-redis.ai.svc:6379/0",
        }
        assert st["variants"]["cpu"] == {
            "replicas": 2,
            "readyReplicas": 0,
            "summary": "0/2",
            "autoscaling": "off",
        }
        ready = condition(kmock, "Ready")
        assert ready["status"] == "False" and "cpu: no ready replica" in ready["message"]
        mon = condition(kmock, "Monitoring")
        assert mon["status"] == "False" and mon["reason"] == "NoPrometheusOperator"
        assert st["monitoring"] == {"serviceMonitor": "APINotAvailable"}


async def test_noop_reconcile_writes_nothing(kmock: ApiServer) -> None:
    declare(kmock)
    async with running_operator(kmock):
        await create(kmock, GP, "guard", SPEC)
        await eventually(lambda: gp_status(kmock).get("observedGeneration") == 1, "first reconcile")
        await eventually(lambda: handled(kmock), "kopf's handling cycle done")
        # Let the drift timer run at least twice over a settled object: it must write nothing.
        await assert_settled(kmock)


async def test_update_patches_children_and_disabling_a_variant_deletes_it(kmock: ApiServer) -> None:
    declare(kmock, custom_metrics=True, monitoring=True)
    async with running_operator(kmock):
        await create(
            kmock,
            GP,
            "guard",
            {
                "spec": {
                    **SPEC["spec"],
                    "variants": {"cuda": {"enabled": True, "autoscaling": {"enabled": True, "maxReplicas": 3}}},
                }
            },
        )
        await eventually(lambda: "guard-cuda" in children(kmock)["deployments"], "cuda deployment")
        await eventually(lambda: gp_status(kmock).get("observedGeneration") == 1, "status")
        assert "replicas" not in objects(kmock, "apps/v1/deployments")["guard-cuda"]["spec"]
        hpa = objects(kmock, "autoscaling/v2/horizontalpodautoscalers")["guard-cuda"]
        assert hpa["spec"]["metrics"][0]["type"] == "Pods"
        assert gp_status(kmock)["variants"]["cuda"]["autoscaling"] == "requests-per-second"
        assert children(kmock)["servicemonitors"] == {"guard"}
        assert condition(kmock, "Monitoring")["status"] == "True"

        await patch(
            kmock,
            GP,
            "guard",
            {"spec": {"upstream": {"url": "http://other:11434"}, "variants": {"cuda": {"enabled": False}}}},
        )

        def updated() -> bool:
            dep = objects(kmock, "apps/v1/deployments")["guard-cpu"]
            env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
            return env["OLLAMA_URL"] == "http://other:11434"

        await eventually(updated, "cpu deployment points at the new upstream")
        await eventually(lambda: "guard-cuda" not in children(kmock)["deployments"], "cuda deployment deleted")
        await eventually(
            lambda: not children(kmock)["hpas"] and children(kmock)["pdbs"] == {"guard-cpu"},
            "cuda HPA and PDB deleted",
        )
        await eventually(lambda: gp_status(kmock).get("observedGeneration") == 2, "status of generation 2")
        assert set(gp_status(kmock)["variants"]) == {"cpu"}


async def test_switching_redis_to_external_removes_the_managed_one(kmock: ApiServer) -> None:
    declare(kmock)
    async with running_operator(kmock):
        await create(kmock, "v1/secrets", "redis-url", {"stringData": {"url": "redis://r:6379/0"}})
        await create(kmock, GP, "guard", SPEC)
        await eventually(lambda: children(kmock)["statefulsets"] == {"guard-redis"}, "managed redis")
        await patch(
            kmock,
            GP,
            "guard",
            {"spec": {"redis": {"mode": "external", "external": {"urlSecret": {"name": "redis-url"}}}}},
        )
        await eventually(lambda: not children(kmock)["statefulsets"], "StatefulSet gone")
        got = children(kmock)
        assert got["services"] == {"guard"} and got["secrets"] == {"redis-url"}
        await eventually(lambda: gp_status(kmock).get("redis", {}).get("state") == "External", "redis external")


async def test_invalid_spec_is_reported_and_not_retried(kmock: ApiServer) -> None:
    declare(kmock)
    async with running_operator(kmock):
        await create(kmock, GP, "guard", {"spec": {**SPEC["spec"], "redis": {"mode": "external"}}})
        ready = await eventually(lambda: condition(kmock, "Ready"), "Ready condition")
        assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
        assert "redis.external.url or .urlSecret" in ready["message"]
        assert condition(kmock, "Degraded")["status"] == "True"
        assert not children(kmock)["deployments"]
        # The drift timer sees the reported invalid generation and leaves it alone: a valid neighbour's
        # timer passes measure the time it had to misbehave in.
        await eventually(lambda: handled(kmock), "kopf's handling cycle done")
        await create(kmock, GP, "witness", SPEC)
        await eventually(lambda: handled(kmock, "witness"), "the neighbour handled")
        settled = len([w for w in kmock.writes if "/guardproxies/guard" in w[1]])

        def passes() -> int:
            return len([p for m, p in kmock.log if p.endswith("/deployments") and "GET" in m])

        before = passes()
        await eventually(lambda: passes() >= before + 2, "two of the neighbour's drift passes")
        assert len([w for w in kmock.writes if "/guardproxies/guard" in w[1]]) == settled


async def test_missing_secret_is_a_temporary_error(kmock: ApiServer) -> None:
    declare(kmock)
    async with running_operator(kmock):
        await create(kmock, GP, "guard", {"spec": {**SPEC["spec"], "auth": {"apiKeysSecret": {"name": "keys"}}}})
        ready = await eventually(lambda: condition(kmock, "Ready"), "Ready condition")
        assert ready["reason"] == "MissingDependency" and "keys" in ready["message"]
        await create(kmock, "v1/secrets", "keys", {"stringData": {"api-keys.yaml": "[]"}})
        # The retry (5 s backoff) or the update it triggers is not awaited here: the secret exists now,
        # and the next reconcile builds the children. Trigger one by touching the spec.
        await patch(kmock, GP, "guard", {"spec": {"service": {"port": 8081}}})
        await eventually(lambda: children(kmock)["deployments"] == {"guard-cpu"}, "children after the secret")


@pytest.fixture
async def health_server() -> AsyncIterator[dict[str, Any]]:
    """A real HTTP /health endpoint on loopback whose answer the test flips."""
    state: dict[str, Any] = {"healthy": True}

    async def health(_: aiohttp.web.Request) -> aiohttp.web.Response:
        if not state["healthy"]:
            return aiohttp.web.json_response({"status": "loading"}, status=503)
        return aiohttp.web.json_response({"status": "ok", "device": "mps", "version": "0.1.0"})

    app = aiohttp.web.Application()
    app.router.add_get("/health", health)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state["port"] = runner.addresses[0][1]
    yield state
    await runner.cleanup()


def scan_slices(kmock: ApiServer) -> list[dict[str, Any]]:
    """The operator's ScanNode slices (the EndpointSlice controller's slices of the Services left out)."""
    return [
        s
        for s in objects(kmock, "discovery.k8s.io/v1/endpointslices").values()
        if s["metadata"]["labels"].get("endpointslice.kubernetes.io/managed-by") == "ollama-guard-operator"
    ]


def controller_slice_deletes(kmock: ApiServer) -> list[str]:
    """DELETEs the operator sent for slices it does not own: the controller's, which serve the Service."""
    ours = {"guard-scannodes-"}
    return [p for m, p in kmock.writes if m == "DELETE" and "/endpointslices/" in p and not any(o in p for o in ours)]


def slice_addresses(kmock: ApiServer) -> list[str]:
    return [a for s in scan_slices(kmock) for ep in s["endpoints"] for a in ep["addresses"]]


async def test_scannode_health_flips_move_it_in_and_out_of_the_slice(
    kmock: ApiServer, health_server: dict[str, Any]
) -> None:
    declare(kmock)
    async with running_operator(kmock):
        await create(kmock, GP, "guard", SPEC)
        await create(
            kmock,
            SN,
            "mini-1",
            {
                "spec": {
                    "guardProxy": "guard",
                    "address": "localhost",  # 127.0.0.1 is refused in an EndpointSlice
                    "port": health_server["port"],
                    "probe": {"failureThreshold": 2, "timeoutSeconds": 1},
                }
            },
        )
        await create(kmock, SN, "mini-dead", {"spec": {"guardProxy": "guard", "address": "localhost", "port": 1}})
        await eventually(lambda: slice_addresses(kmock) == ["localhost"], "healthy node in the slice")
        (sl,) = scan_slices(kmock)
        assert sl["addressType"] == "FQDN" and sl["ports"][0]["port"] == health_server["port"]
        assert sl["metadata"]["labels"]["kubernetes.io/service-name"] == "guard"
        node = objects(kmock, SN)["mini-1"]["status"]
        assert node["healthy"] is True and node["device"] == "mps" and node["latencyMs"] >= 0
        await eventually(lambda: objects(kmock, SN)["mini-dead"]["status"]["healthy"] is False, "dead node")
        await eventually(lambda: gp_status(kmock).get("externalNodes", {}).get("summary") == "1/2", "1/2")

        health_server["healthy"] = False
        await eventually(lambda: slice_addresses(kmock) == [], "unhealthy node leaves the slice")
        # The slice and the node's status are two writes: wait for the one asserted on, do not assume it.
        await eventually(
            lambda: (
                objects(kmock, SN)["mini-1"]["status"]["healthy"] is False
                and objects(kmock, SN)["mini-1"]["status"]["consecutiveFailures"] == 2
            ),
            "the node's status says unhealthy after failureThreshold (2) failures",
        )

        health_server["healthy"] = True
        await eventually(lambda: slice_addresses(kmock) == ["localhost"], "node returns when healthy")

        await delete(kmock, SN, "mini-1")
        await eventually(lambda: slice_addresses(kmock) == [], "deleted node leaves the slice")
        await eventually(lambda: gp_status(kmock).get("externalNodes", {}).get("summary") == "0/1", "0/1")
        assert controller_slice_deletes(kmock) == []
