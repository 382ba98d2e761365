"""Builders: every child validates against the Kubernetes 1.33 schemas, and carries what matters."""

from __future__ import annotations

import kubernetes_validate
import pytest
from ollama_guard_operator import builders
from ollama_guard_operator.builders import Capabilities, NodeEndpoint, Owner
from ollama_guard_operator.spec import InvalidSpec, parse_guardproxy, parse_scannode

OWNER = Owner(name="guard", namespace="ai", uid="0b1c2d3e-0000-4000-8000-000000000001")
UPSTREAM = {"upstream": {"url": "http://ollama.ai.svc:11434"}}

SPECS = {
    "defaults": {},
    "cuda-autoscaled": {
        "variants": {
            "cpu": {"enabled": False},
            "cuda": {
                "enabled": True,
                "gpuCount": 2,
                "nodeSelector": {"nvidia.com/gpu.present": "true"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "runtimeClassName": "nvidia",
                "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4},
            },
        }
    },
    "both-external-redis": {
        "variants": {"cuda": {"enabled": True}, "cpu": {"replicas": 3, "podAntiAffinity": "required"}},
        "redis": {
            "mode": "external",
            "external": {"urlSecret": {"name": "redis-url"}, "passwordSecret": {"name": "redis-pw"}},
        },
        "auth": {"apiKeysSecret": {"name": "keys"}, "adminTokenSecret": {"name": "admin"}},
    },
    "no-redis-pvc-pulljob": {
        "redis": {"mode": "disabled"},
        "models": {"persistentVolumeClaim": "weights", "pullJob": {"enabled": True}},
        "service": {"type": "LoadBalancer", "port": 80, "annotations": {"a": "b"}},
        "config": {
            "input_scanners": {"BanSubstrings": {"substrings": ["x"]}},
            "limits": {"max_body_bytes": 1},
        },
        "image": {"repository": "registry.local/og", "tag": "dev", "pullSecrets": ["regcred"]},
    },
    "single-replica-managed-redis": {
        "variants": {"cpu": {"replicas": 1, "resources": {"requests": {"cpu": "250m"}}}},
        "redis": {"managed": {"maxMemory": "1gb", "storageClassName": "fast", "evictionPolicy": "allkeys-lfu"}},
    },
}
CAPS = [Capabilities(), Capabilities(custom_metrics=True, service_monitors=True)]
NODES = [
    NodeEndpoint("mini-1", parse_scannode({"guardProxy": "guard", "address": "192.168.1.20"})),
    NodeEndpoint("mini-2", parse_scannode({"guardProxy": "guard", "address": "mini2.lan", "port": 9000})),
]


def build(name: str, caps: Capabilities, nodes: list[NodeEndpoint] | None = None) -> list[dict]:
    spec = parse_guardproxy({**UPSTREAM, **SPECS[name]})
    password = "pw"  # noqa: S105 - a test value
    return builders.desired(OWNER, spec, caps, redis_password=password, nodes=nodes or [])


def by_kind(objs: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


@pytest.mark.parametrize("caps", CAPS, ids=["bare", "metrics+monitoring"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_child_validates_and_is_owned(name: str, caps: Capabilities) -> None:
    for obj in build(name, caps, NODES):
        if obj["kind"] == "ServiceMonitor":
            continue  # kubernetes-validate has no schemas for custom resources
        kubernetes_validate.validate(obj, "1.33", strict=True)
        meta = obj["metadata"]
        assert meta["namespace"] == "ai"
        assert meta["ownerReferences"] == [OWNER.reference]
        assert meta["labels"][builders.LABEL_GUARDPROXY] == "guard"


def test_cpu_deployment_is_hardened_and_probed() -> None:
    dep = by_kind(build("defaults", Capabilities()), "Deployment")["guard-cpu"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert dep["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"name": "tmp", "mountPath": "/tmp"}  # noqa: S108 in c["volumeMounts"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    env = {e["name"]: e for e in c["env"]}
    assert env["OLLAMA_GUARD_CONFIG"]["value"] == "/etc/ollama-guard/config.yaml"
    assert env["OLLAMA_URL"]["value"] == "http://ollama.ai.svc:11434"
    assert env["LLM_GUARD_DEVICE"]["value"] == "cpu"
    assert env["MODELS_PATH"]["value"] == "/models"
    assert env["REDIS_URL"]["value"] == "redis://guard-redis.ai.svc:6379/0"
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "guard-redis", "key": "password"}
    assert "nvidia.com/gpu" not in str(c["resources"])
    assert pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_cuda_variant_requests_gpus_and_lands_on_gpu_nodes() -> None:
    objs = build("cuda-autoscaled", Capabilities())
    deps = by_kind(objs, "Deployment")
    assert set(deps) == {"guard-cuda"}
    dep = deps["guard-cuda"]
    pod = dep["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "2" and res["requests"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"name": "LLM_GUARD_DEVICE", "value": "cuda"} in pod["containers"][0]["env"]


def test_cuda_defaults_tolerate_the_gpu_taint() -> None:
    dep = by_kind(build("both-external-redis", Capabilities()), "Deployment")["guard-cuda"]
    assert builders.GPU_TOLERATION in dep["spec"]["template"]["spec"]["tolerations"]
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_autoscaled_deployment_has_no_replicas_and_hpa_follows_capabilities() -> None:
    bare = build("cuda-autoscaled", Capabilities())
    assert "replicas" not in by_kind(bare, "Deployment")["guard-cuda"]["spec"]
    (metric,) = by_kind(bare, "HorizontalPodAutoscaler")["guard-cuda"]["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["target"]["averageUtilization"] == 70
    rich = build("cuda-autoscaled", Capabilities(custom_metrics=True))
    hpa = by_kind(rich, "HorizontalPodAutoscaler")["guard-cuda"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "ollama_guard_requests_per_second"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "10"}
    assert hpa["spec"]["scaleTargetRef"]["name"] == "guard-cuda"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)


def test_service_selects_all_variants_and_pdbs_cover_each() -> None:
    objs = build("both-external-redis", Capabilities())
    svc = by_kind(objs, "Service")["guard"]
    assert svc["spec"]["selector"] == {
        "app.kubernetes.io/instance": "guard",
        "app.kubernetes.io/component": "proxy",
    }
    for name, dep in by_kind(objs, "Deployment").items():
        assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        pdb = by_kind(objs, "PodDisruptionBudget")[name]
        assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    cpu = by_kind(objs, "Deployment")["guard-cpu"]["spec"]["template"]["spec"]
    assert cpu["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]


def test_external_redis_has_no_statefulset_and_reads_secrets() -> None:
    objs = build("both-external-redis", Capabilities())
    assert not by_kind(objs, "StatefulSet") and not by_kind(objs, "Secret")
    env = {
        e["name"]: e
        for e in by_kind(objs, "Deployment")["guard-cpu"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "redis-url", "key": "url"}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis-pw", "key": "password"}
    assert env["OLLAMA_GUARD_API_KEYS_FILE"]["value"].endswith("/api-keys.yaml")
    assert env["OLLAMA_GUARD_AUTH__ENABLED"] == {"name": "OLLAMA_GUARD_AUTH__ENABLED", "value": "true"}
    assert env["OLLAMA_GUARD_ADMIN_TOKEN_FILE"]["value"].endswith("/token")


@pytest.mark.parametrize("name", [n for n in SPECS if "apiKeysSecret" not in SPECS[n].get("auth", {})])
def test_no_api_keys_secret_leaves_auth_to_the_config(name: str) -> None:
    for dep in by_kind(build(name, Capabilities()), "Deployment").values():
        env = {e["name"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert "OLLAMA_GUARD_AUTH__ENABLED" not in env and "OLLAMA_GUARD_API_KEYS_FILE" not in env


def test_api_keys_secret_turns_auth_on_in_the_proxy_settings(tmp_path) -> None:
    """The env the pod gets, keys file included, makes the proxy require a key."""
    from ollama_guard.security import Authenticator, hash_key
    from ollama_guard.settings import load_settings

    spec = parse_guardproxy({**UPSTREAM, "auth": {"apiKeysSecret": {"name": "keys", "key": "k.yaml"}}})
    (container,) = builders.deployment(OWNER, spec, "cpu", spec.variants.cpu)["spec"]["template"]["spec"]["containers"]
    keys = tmp_path / "k.yaml"
    keys.write_text(f"- name: team-a\n  sha256: {hash_key('secret-key')}\n")
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert env["OLLAMA_GUARD_API_KEYS_FILE"] == "/var/run/ollama-guard/api-keys/k.yaml"
    env["OLLAMA_GUARD_API_KEYS_FILE"] = str(keys)
    env.pop("OLLAMA_GUARD_CONFIG")
    auth = Authenticator(load_settings(environ=env).auth)
    assert auth.enabled
    principal = auth.check_key("secret-key")
    assert principal is not None and principal.name == "team-a"
    assert auth.check_key("wrong") is None


def test_managed_redis_is_a_bounded_cache() -> None:
    objs = build("single-replica-managed-redis", Capabilities())
    sts = by_kind(objs, "StatefulSet")["guard-redis"]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert c["args"][c["args"].index("--maxmemory") + 1] == "1gb"
    assert c["args"][c["args"].index("--maxmemory-policy") + 1] == "allkeys-lfu"
    assert c["resources"]["limits"]["memory"] == "1344Mi"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "fast"
    assert by_kind(objs, "Service")["guard-redis"]["spec"]["clusterIP"] == "None"
    secret = by_kind(objs, "Secret")["guard-redis"]
    assert secret["metadata"]["annotations"][builders.ANN_CREATE_ONLY] == "true"
    # One replica and no autoscaling: a PDB would block every drain.
    assert not by_kind(objs, "PodDisruptionBudget")


def test_disabled_redis_uses_memory_cache_and_config_rolls_pods() -> None:
    objs = build("no-redis-pvc-pulljob", Capabilities())
    assert not by_kind(objs, "StatefulSet")
    dep = by_kind(objs, "Deployment")["guard-cpu"]
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CACHE_BACKEND"] == "memory" and "REDIS_URL" not in env
    assert dep["spec"]["template"]["spec"]["volumes"][2]["persistentVolumeClaim"]["claimName"] == "weights"
    assert (
        by_kind(objs, "Job")["guard-models-pull"]["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"][
            "claimName"
        ]
        == "weights"
    )
    cm = by_kind(objs, "ConfigMap")["guard-config"]
    assert "BanSubstrings" in cm["data"]["config.yaml"]
    before = dep["spec"]["template"]["metadata"]["annotations"][builders.ANN_CONFIG_HASH]
    changed = parse_guardproxy({**UPSTREAM, **SPECS["no-redis-pvc-pulljob"], "config": {"limits": {"x": 2}}})
    after = builders.deployment(OWNER, changed, "cpu", changed.variants.cpu)
    assert after["spec"]["template"]["metadata"]["annotations"][builders.ANN_CONFIG_HASH] != before


def test_service_monitor_only_where_the_api_exists() -> None:
    assert not by_kind(build("defaults", Capabilities()), "ServiceMonitor")
    sm = by_kind(build("defaults", Capabilities(service_monitors=True)), "ServiceMonitor")["guard"]
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]


def test_endpoint_slices_list_only_given_nodes_per_address_type() -> None:
    slices = by_kind(build("defaults", Capabilities(), NODES), "EndpointSlice")
    assert set(slices) == {"guard-scannodes-ipv4-8080", "guard-scannodes-fqdn-9000"}
    v4 = slices["guard-scannodes-ipv4-8080"]
    assert v4["addressType"] == "IPv4"
    assert v4["metadata"]["labels"]["kubernetes.io/service-name"] == "guard"
    assert v4["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == "ollama-guard-operator"
    assert v4["endpoints"][0]["addresses"] == ["192.168.1.20"]
    assert v4["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert not by_kind(build("defaults", Capabilities(), []), "EndpointSlice")


@pytest.mark.parametrize(
    ("patch", "why"),
    [
        ({"redis": {"mode": "external"}}, "redis.external.url or .urlSecret"),
        ({"variants": {"cuda": {"enabled": True, "gpuCount": 0}}}, "gpuCount must be at least 1"),
        (
            {"variants": {"cpu": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}},
            "minReplicas (5) exceeds maxReplicas (2)",
        ),
        ({"models": {"pullJob": {"enabled": True}}}, "persistentVolumeClaim"),
        ({"upstream": {"url": "ollama:11434"}}, "upstream.url"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_invalid_specs_say_why(patch: dict, why: str) -> None:
    with pytest.raises(InvalidSpec, match=why.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_guardproxy({**UPSTREAM, **patch})
