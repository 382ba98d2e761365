"""The Helm chart, rendered by real helm 3 and helm 4 with several values files."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .conftest import CHART, HELMS, ROOT, VALUES, by_kind, helm_notes, load_yaml, one, require, template, template_fails

pytestmark = pytest.mark.helm

K8S_VERSION = "1.33"
# Kinds the Kubernetes schemas do not know: checked structurally below instead.
CUSTOM_KINDS = {"GuardProxy", "ScanNode", "PrometheusRule", "ServiceMonitor"}
VALUES_SETS: dict[str, tuple[str, ...]] = {
    "defaults": (),
    "guardproxy": ("guardproxy",),
    "monitoring": ("monitoring",),
    "operator-ha": ("operator-ha",),
    "no-rbac": ("no-rbac",),
    "everything": ("guardproxy", "monitoring", "operator-ha"),
}
BAD_VALUES = sorted(p.stem for p in (VALUES / "bad").glob("*.yaml"))
OPERATOR_CRDS = ROOT / "operator" / "ollama_guard_operator" / "crds"


def crd_schema(plural: str) -> dict[str, Any]:
    crd = load_yaml(OPERATOR_CRDS / f"{plural}.yaml")
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def check_custom(obj: dict[str, Any]) -> None:
    kind = obj["kind"]
    assert obj["metadata"]["name"]
    if kind == "GuardProxy":
        assert obj["apiVersion"] == "ollama-guard.io/v1alpha1"
        jsonschema.validate(obj, crd_schema("guardproxies"))
        from ollama_guard_operator.spec import GuardProxySpec

        GuardProxySpec.model_validate(obj["spec"])  # the operator accepts it, cross-field checks included
    elif kind == "PrometheusRule":
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        for group in obj["spec"]["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert rule["alert"] and rule["expr"] and rule["labels"]["severity"]
    else:
        raise AssertionError(f"unexpected custom kind {kind}")


@pytest.mark.parametrize("values", VALUES_SETS)
def test_helm_lint_is_clean(helm: str, values: str) -> None:
    args = [helm, "lint", "--strict", str(CHART), "--namespace", "guard"]
    for name in VALUES_SETS[values]:
        args += ["-f", str(VALUES / f"{name}.yaml")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


@pytest.mark.parametrize("values", VALUES_SETS)
def test_rendered_objects_are_valid_kubernetes(helm: str, values: str) -> None:
    docs = template(helm, *VALUES_SETS[values])
    assert docs
    for obj in docs:
        if obj["kind"] in CUSTOM_KINDS:
            check_custom(obj)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def without_generated_keys(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The docs with the data of the generated API-key Secrets blanked: each render draws a new key."""
    out = []
    for doc in docs:
        if doc["kind"] == "Secret" and doc["metadata"]["name"].endswith(("-api-key", "-api-keys")):
            doc = {**doc, "data": dict.fromkeys(doc["data"], "<generated>")}
        out.append(doc)
    return out


@pytest.mark.parametrize("values", VALUES_SETS)
def test_helm3_and_helm4_render_the_same(values: str) -> None:
    helm3, helm4 = (require(h) for h in HELMS)
    assert without_generated_keys(template(helm3, *VALUES_SETS[values])) == without_generated_keys(
        template(helm4, *VALUES_SETS[values])
    )


def test_defaults_install_only_the_operator_and_its_crds(helm: str) -> None:
    docs = template(helm)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["CustomResourceDefinition"] * 3 + ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"]
    )
    crds = {d["metadata"]["name"] for d in by_kind(docs, "CustomResourceDefinition")}
    assert crds == {
        "guardproxies.ollama-guard.io",
        "scannodes.ollama-guard.io",
        "clusterkopfpeerings.kopf.dev",
    }

    dep = one(docs, "Deployment")
    assert dep["metadata"]["name"] == "og-ollama-guard-operator"
    assert dep["metadata"]["namespace"] == "guard"
    pod = dep["spec"]["template"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "ghcr.io/ollama-guard/ollama-guard-operator:0.1.0"  # appVersion
    assert "--liveness=http://0.0.0.0:8081/healthz" in container["args"]
    assert not any(a.startswith("--namespace") for a in container["args"])  # cluster-wide
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["ports"] == [{"name": "health", "containerPort": 8081, "protocol": "TCP"}]
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # kopf's identity without getpass.getuser(), which fails for a uid with no passwd entry (OpenShift).
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["USER"]["value"]

    sa = one(docs, "ServiceAccount")
    assert pod["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    binding = one(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "guard"}]
    role = one(docs, "ClusterRole")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert role["rules"] == load_yaml(ROOT / "operator" / "ollama_guard_operator" / "rbac.yaml")


def test_guardproxy_from_values(helm: str) -> None:
    docs = template(helm, "guardproxy")
    values = load_yaml(VALUES / "guardproxy.yaml")["guardProxy"]
    gp = one(docs, "GuardProxy")
    assert gp["metadata"]["name"] == "guard"
    assert gp["metadata"]["namespace"] == "guard"
    assert gp["metadata"]["labels"]["team"] == "ml-platform"
    # The values' spec, plus the keys Secret the chart generates (auth is on by default).
    keys = {"apiKeysSecret": {"name": "og-ollama-guard-api-keys", "key": "keys.yaml"}}
    assert gp["spec"] == {**values["spec"], "auth": keys}

    (test_pod,) = [d for d in by_kind(docs, "Pod")]
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    env = {e["name"]: e["value"] for e in test_pod["spec"]["containers"][0]["env"]}
    assert env["URL"] == "http://guard.guard.svc:9000/health"  # the GuardProxy's Service, its port


def test_no_guardproxy_and_no_test_hook_by_default(helm: str) -> None:
    docs = template(helm)
    assert not by_kind(docs, "GuardProxy") and not by_kind(docs, "Pod")


def test_test_hook_can_check_any_url(helm: str) -> None:
    docs = template(helm, extra=("--set", "tests.url=http://guard.other.svc:8080/health"))
    env = {e["name"]: e["value"] for e in one(docs, "Pod")["spec"]["containers"][0]["env"]}
    assert env["URL"] == "http://guard.other.svc:8080/health"


def test_monitoring_pieces_ship_the_deploy_files(helm: str) -> None:
    docs = template(helm, "monitoring")
    configmaps = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}

    dashboard = configmaps["og-ollama-guard-dashboard"]
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(dashboard["data"]["ollama-guard.json"])
    assert shipped == json.loads((ROOT / "deploy/grafana/dashboards/ollama-guard.json").read_text())

    rule = one(docs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == load_yaml(ROOT / "deploy/prometheus/alerts.yml")

    adapter = configmaps["og-ollama-guard-adapter-rules"]
    assert adapter["metadata"]["namespace"] == "monitoring"
    assert yaml.safe_load(adapter["data"]["config.yaml"]) == load_yaml(ROOT / "deploy/prometheus/adapter-rules.yaml")


def test_operator_ha_values(helm: str) -> None:
    docs = template(helm, "operator-ha")
    dep = one(docs, "Deployment")
    assert dep["metadata"]["name"] == "guard-system-operator"
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/mirror/ollama-guard-operator:0.1.0-rc1"
    assert container["imagePullPolicy"] == "Always"
    assert {"--namespace=team-a", "--namespace=team-b", "--verbose"} <= set(container["args"])
    assert {"name": "HTTPS_PROXY", "value": "http://proxy.example.com:3128"} in container["env"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "guard-operator"
    assert one(docs, "ServiceAccount")["metadata"]["name"] == "guard-operator"
    assert one(docs, "ClusterRoleBinding")["subjects"][0]["name"] == "guard-operator"


def test_rbac_and_service_account_can_be_left_out(helm: str) -> None:
    docs = template(helm, "no-rbac")
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    assert not by_kind(docs, "ServiceAccount") and not by_kind(docs, "Pod")
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "preexisting-operator-sa"


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_schema_rejects_wrong_values(helm: str, bad: str) -> None:
    err = template_fails(helm, "-f", str(VALUES / "bad" / f"{bad}.yaml"))
    assert "values don't meet the specifications of the schema" in err, err


def test_guardproxy_without_upstream_url_fails(helm: str) -> None:
    err = template_fails(helm, "--set", "guardProxy.enabled=true", "--set", "guardProxy.spec.upstream=null")
    assert "upstream" in err, err


def test_chart_default_guardproxy_spec_is_accepted_by_the_operator(helm: str) -> None:
    docs = template(helm, extra=("--set", "guardProxy.enabled=true"))
    check_custom(one(docs, "GuardProxy"))


def notes(tmp_path, *args: str) -> str:
    return helm_notes(tmp_path, *args)


def test_notes_tell_how_to_check_the_operator_and_create_a_guardproxy(tmp_path) -> None:
    text = notes(tmp_path)
    assert "kubectl -n guard rollout status deployment/og-ollama-guard-operator" in text
    assert "kubectl apply -n guard -f manifests/examples/guardproxy-minimal.yaml" in text


def test_notes_tell_how_to_reach_the_proxy_and_check_autoscaling(tmp_path) -> None:
    text = notes(tmp_path, "-f", str(VALUES / "guardproxy.yaml"), "--set", "monitoring.adapterRules.enabled=true")
    assert "http://guard.guard.svc:9000" in text
    assert "kubectl -n guard port-forward service/guard 8080:9000" in text
    assert "kubectl -n guard wait guardproxy/guard --for=condition=Ready" in text
    assert "helm test og -n guard" in text
    assert "--set rules.existing=og-ollama-guard-adapter-rules" in text
    assert "/apis/custom.metrics.k8s.io/v1beta1/namespaces/guard/pods/*/ollama_guard_requests_per_second" in text
