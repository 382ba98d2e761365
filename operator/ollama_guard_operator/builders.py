"""Pure builders: a GuardProxy (name, namespace, uid, parsed spec) -> the manifests of its children.

No I/O here: the reconcile decides what to apply; these functions only say what the cluster should hold.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from .spec import GuardProxySpec, ScanNodeSpec, Variant

GROUP = "ollama-guard.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
MANAGER = "ollama-guard-operator"
PROXY_PORT = 8080
PROXY_UID = 10001
REDIS_UID = 999
CONFIG_DIR = "/etc/ollama-guard"
CONFIG_KEY = "config.yaml"
RPS_METRIC = "ollama_guard_requests_per_second"

LABEL_GUARDPROXY = f"{GROUP}/guardproxy"
LABEL_VARIANT = f"{GROUP}/variant"
ANN_CONFIG_HASH = f"{GROUP}/config-hash"
ANN_CREATE_ONLY = f"{GROUP}/create-only"

DEFAULT_RESOURCES: dict[str, dict[str, Any]] = {
    "cpu": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
    "cuda": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "8Gi"}},
}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@dataclass(frozen=True)
class Owner:
    """The GuardProxy the children belong to."""

    name: str
    namespace: str
    uid: str

    @property
    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": "GuardProxy",
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class Capabilities:
    """What the cluster serves, found by discovery: decides HPA metrics and the ServiceMonitor."""

    custom_metrics: bool = False
    service_monitors: bool = False


@dataclass(frozen=True)
class NodeEndpoint:
    """A healthy ScanNode as the EndpointSlice needs it."""

    name: str
    spec: ScanNodeSpec


def labels(owner: Owner, component: str, variant: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "ollama-guard",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGER,
        LABEL_GUARDPROXY: owner.name,
    }
    if variant:
        out[LABEL_VARIANT] = variant
    return out


def owned_selector(owner: Owner) -> str:
    """The label selector that finds every child of this GuardProxy (for pruning)."""
    return f"app.kubernetes.io/managed-by={MANAGER},{LABEL_GUARDPROXY}={owner.name}"


def scan_slices_selector(owner: Owner) -> str:
    """The label selector that finds this GuardProxy's ScanNode EndpointSlices and nothing else.

    kube-controller-manager copies a Service's labels onto the EndpointSlices it makes for it
    (shared/k8s-real/02-list-endpointslices-*), so `owned_selector` also matches the slices of our own
    Services; selecting on `endpointslice.kubernetes.io/managed-by` keeps those out of our hands."""
    return f"endpointslice.kubernetes.io/managed-by={MANAGER},{LABEL_GUARDPROXY}={owner.name}"


def _meta(owner: Owner, name: str, component: str, variant: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, component, variant),
        "ownerReferences": [owner.reference],
        **extra,
    }


def _selector(owner: Owner, component: str, variant: str | None = None) -> dict[str, str]:
    sel = {"app.kubernetes.io/instance": owner.name, "app.kubernetes.io/component": component}
    if variant:
        sel[LABEL_VARIANT] = variant
    return sel


def service_name(owner: Owner) -> str:
    return owner.name


def redis_name(owner: Owner) -> str:
    return f"{owner.name}-redis"


def config_text(spec: GuardProxySpec) -> str:
    return yaml.safe_dump(spec.config, sort_keys=True, default_flow_style=False)


def config_hash(spec: GuardProxySpec) -> str:
    return hashlib.sha256(config_text(spec).encode()).hexdigest()[:16]


def content_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def configmap(owner: Owner, spec: GuardProxySpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(owner, f"{owner.name}-config", "config"),
        "data": {CONFIG_KEY: config_text(spec)},
    }


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def redis_url(owner: Owner) -> str:
    return f"redis://{redis_name(owner)}.{owner.namespace}.svc:6379/0"


def _redis_env(owner: Owner, spec: GuardProxySpec) -> list[dict[str, Any]]:
    redis = spec.redis
    if redis.mode == "managed":
        return [
            {"name": "CACHE_BACKEND", "value": "redis"},
            {"name": "REDIS_URL", "value": redis_url(owner)},
            _secret_env("REDIS_PASSWORD", redis_name(owner), "password"),
        ]
    if redis.mode == "external":
        ext = redis.external
        assert ext is not None  # the spec model checks it
        env = [{"name": "CACHE_BACKEND", "value": "redis"}]
        if ext.url_secret is not None:
            env.append(_secret_env("REDIS_URL", ext.url_secret.name, ext.url_secret.key))
        else:
            env.append({"name": "REDIS_URL", "value": str(ext.url)})
        if ext.password_secret is not None:
            env.append(_secret_env("REDIS_PASSWORD", ext.password_secret.name, ext.password_secret.key))
        return env
    return [{"name": "CACHE_BACKEND", "value": "memory"}]


def _resources(name: str, variant: Variant) -> dict[str, Any]:
    res = json.loads(json.dumps(variant.resources or DEFAULT_RESOURCES[name]))
    if name == "cuda":
        gpus = str(variant.gpu_count or 1)
        res.setdefault("limits", {})["nvidia.com/gpu"] = gpus
        res.setdefault("requests", {})["nvidia.com/gpu"] = gpus
    return res


def _affinity(owner: Owner, name: str, variant: Variant) -> dict[str, Any] | None:
    term = {
        "labelSelector": {"matchLabels": _selector(owner, "proxy", name)},
        "topologyKey": "kubernetes.io/hostname",
    }
    if variant.pod_anti_affinity == "required":
        return {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    if variant.pod_anti_affinity == "preferred":
        return {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": term}]
            }
        }
    return None


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": PROXY_UID,
        "runAsGroup": PROXY_UID,
        "fsGroup": PROXY_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _models_volume(owner: Owner, spec: GuardProxySpec) -> dict[str, Any]:
    models = spec.models
    if models.persistent_volume_claim:
        return {
            "name": "models",
            "persistentVolumeClaim": {
                "claimName": models.persistent_volume_claim,
                "readOnly": models.read_only,
            },
        }
    return {"name": "models", "emptyDir": {"sizeLimit": models.size_limit}}


def deployment(owner: Owner, spec: GuardProxySpec, name: str, variant: Variant) -> dict[str, Any]:
    """The Deployment of one variant; no `replicas` when an HPA scales it."""
    env: list[dict[str, Any]] = [
        {"name": "OLLAMA_GUARD_CONFIG", "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
        {"name": "OLLAMA_URL", "value": spec.upstream.url},
        {"name": "PROXY_PORT", "value": str(PROXY_PORT)},
        {"name": "MODELS_PATH", "value": "/models"},
        {"name": "LLM_GUARD_DEVICE", "value": name},
        *_redis_env(owner, spec),
    ]
    if spec.models.persistent_volume_claim:
        env.append({"name": "LLM_GUARD_USE_LOCAL_MODELS", "value": "true"})
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": f"{owner.name}-config"}},
        {"name": "tmp", "emptyDir": {}},
        _models_volume(owner, spec),
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - the container's only writable path
        {"name": "models", "mountPath": "/models", "readOnly": True},
    ]
    auth = spec.auth
    # Each credential Secret is mounted read-only and its key's path handed to the proxy by env.
    for volume, directory, env_name, ref in (
        ("api-keys", "api-keys", "OLLAMA_GUARD_API_KEYS_FILE", auth.api_keys_secret),
        ("admin-token", "admin", "OLLAMA_GUARD_ADMIN_TOKEN_FILE", auth.admin_token_secret),
    ):
        if ref is None:
            continue
        volumes.append({"name": volume, "secret": {"secretName": ref.name}})
        mounts.append({"name": volume, "mountPath": f"/var/run/ollama-guard/{directory}", "readOnly": True})
        env.append({"name": env_name, "value": f"/var/run/ollama-guard/{directory}/{ref.key}"})
    if auth.api_keys_secret is not None:
        # The proxy's auth.enabled defaults to false (local use); keys given means keys required.
        env.append({"name": "OLLAMA_GUARD_AUTH__ENABLED", "value": "true"})

    container = {
        "name": "proxy",
        "image": spec.image.ref,
        "imagePullPolicy": spec.image.pull_policy,
        "args": ["serve"],
        "ports": [{"name": "http", "containerPort": PROXY_PORT, "protocol": "TCP"}],
        "env": env,
        "volumeMounts": mounts,
        "resources": _resources(name, variant),
        "securityContext": _container_security(),
        # Loading the scanners' weights takes a while; the startup probe covers it.
        "startupProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 60,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 30,
    }
    if spec.image.pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in spec.image.pull_secrets]
    if variant.node_selector:
        pod_spec["nodeSelector"] = dict(variant.node_selector)
    tolerations = list(variant.tolerations) or ([GPU_TOLERATION] if name == "cuda" else [])
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if variant.runtime_class_name:
        pod_spec["runtimeClassName"] = variant.runtime_class_name
    affinity = _affinity(owner, name, variant)
    if affinity:
        pod_spec["affinity"] = affinity

    dep_spec: dict[str, Any] = {
        "selector": {"matchLabels": _selector(owner, "proxy", name)},
        "revisionHistoryLimit": 3,
        "template": {
            "metadata": {
                "labels": labels(owner, "proxy", name),
                # A config change changes the template, which rolls the pods.
                "annotations": {ANN_CONFIG_HASH: config_hash(spec)},
            },
            "spec": pod_spec,
        },
    }
    if not variant.autoscaling.enabled:
        dep_spec["replicas"] = variant.replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(owner, f"{owner.name}-{name}", "proxy", name),
        "spec": dep_spec,
    }


def pdb(owner: Owner, name: str, variant: Variant) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(owner, f"{owner.name}-{name}", "proxy", name),
        "spec": {
            "maxUnavailable": variant.pdb.max_unavailable,
            "selector": {"matchLabels": _selector(owner, "proxy", name)},
        },
    }


def hpa_mode(variant: Variant, caps: Capabilities) -> str:
    if not variant.autoscaling.enabled:
        return "off"
    return "requests-per-second" if caps.custom_metrics else "cpu-utilisation"


def hpa(owner: Owner, name: str, variant: Variant, caps: Capabilities) -> dict[str, Any]:
    auto = variant.autoscaling
    if caps.custom_metrics:
        metric = {
            "type": "Pods",
            "pods": {
                "metric": {"name": RPS_METRIC},
                "target": {"type": "AverageValue", "averageValue": auto.target_requests_per_second},
            },
        }
    else:
        metric = {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": auto.target_cpu_utilization},
            },
        }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(owner, f"{owner.name}-{name}", "proxy", name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{owner.name}-{name}"},
            "minReplicas": auto.min_replicas,
            "maxReplicas": auto.max_replicas,
            "metrics": [metric],
        },
    }


def service(owner: Owner, spec: GuardProxySpec) -> dict[str, Any]:
    meta = _meta(owner, service_name(owner), "proxy")
    if spec.service.annotations:
        meta["annotations"] = dict(spec.service.annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": spec.service.type,
            # All in-cluster variants; ScanNodes join through the operator's EndpointSlices.
            "selector": _selector(owner, "proxy"),
            "ports": [{"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def service_url(owner: Owner, spec: GuardProxySpec) -> str:
    return f"http://{service_name(owner)}.{owner.namespace}.svc:{spec.service.port}"


def service_monitor(owner: Owner, spec: GuardProxySpec) -> dict[str, Any]:
    sm = spec.monitoring.service_monitor
    meta = _meta(owner, owner.name, "proxy")
    meta["labels"] = {**meta["labels"], **sm.labels}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": _selector(owner, "proxy")},
            "namespaceSelector": {"matchNames": [owner.namespace]},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": sm.interval}],
        },
    }


_MEM = re.compile(r"^([0-9]+)(b|kb|mb|gb)?$")


def _redis_memory_limit(max_memory: str) -> str:
    """maxmemory plus room for Redis' own overhead and fork copy-on-write, in Mi."""
    m = _MEM.match(max_memory)
    assert m is not None  # the spec model checks the pattern
    factor = {"b": 1, None: 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}[m.group(2)]
    mib = int(m.group(1)) * factor / 1024**2
    return f"{math.ceil(mib * 1.25) + 64}Mi"


def redis_secret(owner: Owner, password: str) -> dict[str, Any]:
    """The managed Redis password; created once, never rewritten (the caller keeps the existing one)."""
    meta = _meta(owner, redis_name(owner), "redis")
    meta["annotations"] = {ANN_CREATE_ONLY: "true"}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "stringData": {"password": password},
    }


def redis_service(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, redis_name(owner), "redis"),
        "spec": {
            "clusterIP": "None",
            "selector": _selector(owner, "redis"),
            "ports": [{"name": "redis", "port": 6379, "targetPort": "redis", "protocol": "TCP"}],
        },
    }


def redis_statefulset(owner: Owner, spec: GuardProxySpec) -> dict[str, Any]:
    r = spec.redis.managed
    resources = (
        json.loads(json.dumps(r.resources))
        if r.resources
        else {
            "requests": {"cpu": "100m", "memory": _redis_memory_limit(r.max_memory)},
            "limits": {"memory": _redis_memory_limit(r.max_memory)},
        }
    )
    pvc_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": r.storage}},
    }
    if r.storage_class_name:
        pvc_spec["storageClassName"] = r.storage_class_name
    tcp = {"tcpSocket": {"port": "redis"}}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(owner, redis_name(owner), "redis"),
        "spec": {
            "serviceName": redis_name(owner),
            "replicas": 1,
            "selector": {"matchLabels": _selector(owner, "redis")},
            "template": {
                "metadata": {"labels": labels(owner, "redis")},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": REDIS_UID,
                        "runAsGroup": REDIS_UID,
                        "fsGroup": REDIS_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "redis",
                            "image": r.image,
                            # A cache: bounded memory, evict under pressure, no append-only log.
                            "command": ["redis-server"],
                            "args": [
                                "--requirepass",
                                "$(REDIS_PASSWORD)",
                                "--maxmemory",
                                r.max_memory,
                                "--maxmemory-policy",
                                r.eviction_policy,
                                "--appendonly",
                                "no",
                                "--save",
                                "900 1",
                                "--dir",
                                "/data",
                            ],
                            "env": [_secret_env("REDIS_PASSWORD", redis_name(owner), "password")],
                            "ports": [{"name": "redis", "containerPort": 6379, "protocol": "TCP"}],
                            "resources": resources,
                            "securityContext": _container_security(),
                            "readinessProbe": {**tcp, "periodSeconds": 5},
                            "livenessProbe": {**tcp, "periodSeconds": 10, "failureThreshold": 3},
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                        }
                    ],
                },
            },
            "volumeClaimTemplates": [
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": "data", "labels": labels(owner, "redis")},
                    "spec": pvc_spec,
                }
            ],
        },
    }


def models_job(owner: Owner, spec: GuardProxySpec) -> dict[str, Any]:
    """A Job that pulls the weights into the models PVC; Jobs are immutable, so it is created once."""
    meta = _meta(owner, f"{owner.name}-models-pull", "models")
    meta["annotations"] = {ANN_CREATE_ONLY: "true"}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": spec.models.pull_job.backoff_limit,
            "template": {
                "metadata": {"labels": labels(owner, "models")},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    "containers": [
                        {
                            "name": "pull",
                            "image": spec.image.ref,
                            "imagePullPolicy": spec.image.pull_policy,
                            "command": list(spec.models.pull_job.command),
                            "env": [{"name": "MODELS_PATH", "value": "/models"}],
                            "securityContext": _container_security(),
                            "volumeMounts": [
                                {"name": "models", "mountPath": "/models"},
                                {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108
                            ],
                        }
                    ],
                    "volumes": [
                        {
                            "name": "models",
                            "persistentVolumeClaim": {"claimName": spec.models.persistent_volume_claim},
                        },
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def endpoint_slices(owner: Owner, nodes: Iterable[NodeEndpoint]) -> list[dict[str, Any]]:
    """One EndpointSlice per (address type, port) listing the healthy ScanNodes; none when none is healthy."""
    groups: dict[tuple[str, int], list[NodeEndpoint]] = {}
    for node in nodes:
        groups.setdefault((node.spec.address_type, node.spec.port), []).append(node)
    slices: list[dict[str, Any]] = []
    for (addr_type, port), members in sorted(groups.items()):
        meta = _meta(owner, f"{owner.name}-scannodes-{addr_type.lower()}-{port}", "scannodes")
        meta["labels"] = {
            **meta["labels"],
            "kubernetes.io/service-name": service_name(owner),
            "endpointslice.kubernetes.io/managed-by": MANAGER,
        }
        slices.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": meta,
                "addressType": addr_type,
                "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
                "endpoints": [
                    {
                        "addresses": [m.spec.address],
                        "conditions": {"ready": True, "serving": True, "terminating": False},
                        "hostname": m.name if len(m.name) <= 63 and "." not in m.name else None,
                    }
                    for m in sorted(members, key=lambda m: m.name)
                ],
            }
        )
        for ep in slices[-1]["endpoints"]:
            if ep["hostname"] is None:
                del ep["hostname"]
    return slices


def desired(
    owner: Owner,
    spec: GuardProxySpec,
    caps: Capabilities,
    *,
    redis_password: str,
    nodes: Iterable[NodeEndpoint] = (),
) -> list[dict[str, Any]]:
    """Everything this GuardProxy should own, in apply order."""
    objs: list[dict[str, Any]] = [configmap(owner, spec)]
    if spec.redis.mode == "managed":
        objs += [redis_secret(owner, redis_password), redis_service(owner), redis_statefulset(owner, spec)]
    if spec.models.pull_job.enabled:
        objs.append(models_job(owner, spec))
    for name, variant in spec.enabled_variants().items():
        objs.append(deployment(owner, spec, name, variant))
        if variant.pdb.enabled and (variant.autoscaling.enabled or variant.replicas > 1):
            objs.append(pdb(owner, name, variant))
        if variant.autoscaling.enabled:
            objs.append(hpa(owner, name, variant, caps))
    objs.append(service(owner, spec))
    if caps.service_monitors and spec.monitoring.service_monitor.enabled:
        objs.append(service_monitor(owner, spec))
    objs += endpoint_slices(owner, nodes)
    return objs
