"""The reconcile logic, free of kopf: GuardProxy -> children + status; ScanNodes -> EndpointSlices + status.

handlers.py wires these to kopf; tests may call them directly.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from . import builders, status
from .apply import Outcome, apply_kind, get_or_none
from .builders import Capabilities, NodeEndpoint, Owner
from .kube import Kube, NotFound
from .spec import GuardProxySpec, InvalidSpec, parse_guardproxy, parse_scannode

CUSTOM_METRICS_GROUP = "custom.metrics.k8s.io"
MONITORING_GROUP = "monitoring.coreos.com"

# (apiVersion, kind) in apply order; the ServiceMonitor only where its API is served.
CHILD_KINDS: list[tuple[str, str]] = [
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "Service"),
    ("apps/v1", "StatefulSet"),
    ("batch/v1", "Job"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
]
SERVICE_MONITOR = ("monitoring.coreos.com/v1", "ServiceMonitor")


class MissingDependency(Exception):
    """Something the GuardProxy refers to does not exist yet; retried with backoff."""


@dataclass
class Result:
    outcome: Outcome
    status: dict[str, Any]


def owner_of(body: dict[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


async def capabilities(kube: Kube) -> Capabilities:
    groups = await kube.api_groups()
    return Capabilities(custom_metrics=CUSTOM_METRICS_GROUP in groups, service_monitors=MONITORING_GROUP in groups)


async def scan_nodes(kube: Kube, owner: Owner) -> tuple[list[NodeEndpoint], int]:
    """The healthy ScanNodes serving this GuardProxy, and how many serve it in all."""
    healthy, total = [], 0
    for obj in await kube.list("ollama-guard.io/v1alpha1", "ScanNode", owner.namespace):
        if obj.get("metadata", {}).get("deletionTimestamp"):
            continue
        try:
            spec = parse_scannode(obj.get("spec") or {})
        except InvalidSpec:
            continue
        if spec.guard_proxy != owner.name:
            continue
        total += 1
        if (obj.get("status") or {}).get("healthy") is True:
            healthy.append(NodeEndpoint(name=obj["metadata"]["name"], spec=spec))
    return healthy, total


def _nodes_status(healthy: int, total: int) -> dict[str, Any]:
    return {"healthy": healthy, "total": total, "summary": f"{healthy}/{total}"}


async def _check_secrets(kube: Kube, owner: Owner, spec: GuardProxySpec) -> None:
    refs = []
    if spec.auth.api_keys_secret:
        refs.append(spec.auth.api_keys_secret.name)
    if spec.auth.admin_token_secret:
        refs.append(spec.auth.admin_token_secret.name)
    ext = spec.redis.external
    if spec.redis.mode == "external" and ext is not None:
        refs += [s.name for s in (ext.url_secret, ext.password_secret) if s is not None]
    missing = [n for n in refs if await get_or_none(kube, "v1", "Secret", owner.namespace, n) is None]
    if missing:
        raise MissingDependency(f"Secret(s) not found: {', '.join(sorted(set(missing)))}")


async def reconcile_guardproxy(kube: Kube, body: dict[str, Any]) -> Result:
    """Converge one GuardProxy's children and compute its status. Raises InvalidSpec, MissingDependency."""
    owner = owner_of(body)
    spec = parse_guardproxy(body.get("spec") or {})
    await _check_secrets(kube, owner, spec)
    caps = await capabilities(kube)
    desired = builders.desired(owner, spec, caps, redis_password=secrets.token_urlsafe(24))
    selector = builders.owned_selector(owner)

    outcome = Outcome()
    kinds = list(CHILD_KINDS) + ([SERVICE_MONITOR] if caps.service_monitors else [])
    for api_version, kind in kinds:
        outcome.merge(await apply_kind(kube, api_version, kind, owner.namespace, selector, desired))
    nodes = await sync_scan_nodes(kube, owner.namespace, owner.name, gp=body)
    if nodes is not None:
        outcome.merge(nodes)
    return Result(outcome, guardproxy_status(body, owner, spec, caps, outcome))


def guardproxy_status(
    body: dict[str, Any],
    owner: Owner,
    spec: GuardProxySpec,
    caps: Capabilities,
    outcome: Outcome,
) -> dict[str, Any]:
    """Everything in status but externalNodes, which sync_scan_nodes keeps."""
    generation = body.get("metadata", {}).get("generation")
    variants: dict[str, Any] = {}
    waiting: list[str] = []
    rolling: list[str] = []
    for name, variant in spec.enabled_variants().items():
        dep = outcome.live.get(("Deployment", f"{owner.name}-{name}")) or {}
        st = dep.get("status") or {}
        want = (dep.get("spec") or {}).get("replicas")
        if want is None:
            want = variant.autoscaling.min_replicas if variant.autoscaling.enabled else variant.replicas
        ready = int(st.get("readyReplicas") or 0)
        variants[name] = {
            "replicas": int(want),
            "readyReplicas": ready,
            "summary": f"{ready}/{want}",
            "autoscaling": builders.hpa_mode(variant, caps),
        }
        if want and ready < 1:
            waiting.append(f"{name}: no ready replica")
        if int(st.get("updatedReplicas") or 0) < int(want) or (st.get("observedGeneration") or 0) < (
            dep.get("metadata", {}).get("generation") or 0
        ):
            rolling.append(name)

    if spec.redis.mode == "managed":
        sts = outcome.live.get(("StatefulSet", builders.redis_name(owner))) or {}
        redis_ready = int((sts.get("status") or {}).get("readyReplicas") or 0) >= 1
        redis = {
            "mode": "managed",
            "state": "Ready" if redis_ready else "Pending",
            "url": builders.redis_url(owner),
        }
        if not redis_ready:
            waiting.append("redis: not ready")
    elif spec.redis.mode == "external":
        redis = {"mode": "external", "state": "External"}
    else:
        redis = {"mode": "disabled", "state": "Disabled"}

    if caps.service_monitors and spec.monitoring.service_monitor.enabled:
        monitoring = status.condition(
            status.MONITORING,
            True,
            "ServiceMonitorCreated",
            f"ServiceMonitor {owner.name} scrapes /metrics",
            generation,
        )
        sm_state = "Created"
    elif not spec.monitoring.service_monitor.enabled:
        monitoring = status.condition(
            status.MONITORING,
            False,
            "Disabled",
            "spec.monitoring.serviceMonitor.enabled is false",
            generation,
        )
        sm_state = "Disabled"
    else:
        monitoring = status.condition(
            status.MONITORING,
            False,
            "NoPrometheusOperator",
            "the monitoring.coreos.com API is not served: no ServiceMonitor created",
            generation,
        )
        sm_state = "APINotAvailable"

    conditions = [
        status.condition(
            status.READY,
            not waiting,
            "AllReady" if not waiting else "Waiting",
            "all variants and Redis are ready" if not waiting else "; ".join(waiting),
            generation,
        ),
        status.condition(
            status.PROGRESSING,
            bool(rolling),
            "RollingOut" if rolling else "Stable",
            f"rolling out: {', '.join(rolling)}" if rolling else "all children match the spec",
            generation,
        ),
        status.condition(status.DEGRADED, False, "Reconciled", "the last reconcile succeeded", generation),
        monitoring,
    ]
    old = body.get("status") or {}
    return {
        "observedGeneration": generation,
        "conditions": status.merge_conditions(old.get("conditions"), conditions),
        "variants": variants,
        "redis": redis,
        "monitoring": {"serviceMonitor": sm_state},
        "serviceURL": builders.service_url(owner, spec),
    }


def failed_status(body: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    """Status for a GuardProxy that cannot be reconciled (invalid spec, missing dependency)."""
    generation = body.get("metadata", {}).get("generation")
    old = body.get("status") or {}
    conditions = [
        status.condition(status.READY, False, reason, message, generation),
        status.condition(status.PROGRESSING, False, reason, message, generation),
        status.condition(status.DEGRADED, True, reason, message, generation),
    ]
    keep = [c for c in old.get("conditions") or [] if c.get("type") == status.MONITORING]
    return {
        "observedGeneration": generation,
        "conditions": status.merge_conditions(old.get("conditions"), conditions) + keep,
    }


async def sync_scan_nodes(
    kube: Kube, namespace: str, guardproxy: str, *, gp: dict[str, Any] | None = None
) -> Outcome | None:
    """Make the ScanNode EndpointSlices list exactly the healthy nodes; update the node counts."""
    # EndpointSlices have two triggers (the GuardProxy's reconcile, any ScanNode event): one writer at a
    # time per GuardProxy, each reading the nodes afresh, so a stale reader never undoes a newer write.
    async with kube.lock(("EndpointSlices", namespace, guardproxy)):
        if gp is None:
            try:
                gp = await kube.get("ollama-guard.io/v1alpha1", "GuardProxy", namespace, guardproxy)
            except NotFound:
                return None  # no Service to attach to; the GuardProxy's reconcile does it once it exists
        if gp.get("metadata", {}).get("deletionTimestamp"):
            return None
        return await _sync_scan_nodes(kube, gp)


async def _sync_scan_nodes(kube: Kube, gp: dict[str, Any]) -> Outcome:
    owner = owner_of(gp)
    namespace, guardproxy = owner.namespace, owner.name
    healthy, total = await scan_nodes(kube, owner)
    outcome = await apply_kind(
        kube,
        "discovery.k8s.io/v1",
        "EndpointSlice",
        namespace,
        builders.scan_slices_selector(owner),
        builders.endpoint_slices(owner, healthy),
    )
    nodes = _nodes_status(len(healthy), total)
    if (gp.get("status") or {}).get("externalNodes") != nodes:
        await kube.merge_patch(
            "ollama-guard.io/v1alpha1",
            "GuardProxy",
            namespace,
            guardproxy,
            {"status": {"externalNodes": nodes}},
            sub="status",
        )
    return outcome


def next_node_status(old: dict[str, Any] | None, ok: bool, spec_threshold: tuple[int, int]) -> tuple[bool, int, int]:
    """(healthy, consecutiveFailures, consecutiveSuccesses) after one probe, with the thresholds applied.

    The counters stop at their threshold: past it they change nothing, and a settled node's status then
    stays the same from probe to probe (no write)."""
    failure_threshold, success_threshold = spec_threshold
    old = old or {}
    failures = 0 if ok else min(int(old.get("consecutiveFailures") or 0) + 1, failure_threshold)
    successes = min(int(old.get("consecutiveSuccesses") or 0) + 1, success_threshold) if ok else 0
    was = old.get("healthy")
    if was is None:
        healthy = ok  # first probe decides
    elif was:
        healthy = failures < failure_threshold
    else:
        healthy = successes >= success_threshold
    return healthy, failures, successes
