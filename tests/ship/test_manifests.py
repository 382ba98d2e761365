"""manifests/ and the chart's copies agree with their sources: one source of truth."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .conftest import CHART, ROOT, load_yaml, require

MANIFESTS = ROOT / "manifests"
EXAMPLES = sorted((MANIFESTS / "examples").glob("*.yaml"))
OPERATOR_CRDS = ROOT / "operator" / "ollama_guard_operator" / "crds"
RENDER = [sys.executable, str(ROOT / "scripts" / "render_manifests.py"), "--check"]


def test_operator_crds_exist() -> None:
    names = {p.name for p in OPERATOR_CRDS.glob("*.yaml")}
    assert {"guardproxies.yaml", "scannodes.yaml"} <= names


def test_copies_match_their_sources() -> None:
    """CRDs, RBAC rules, dashboard and rules copied into the chart and manifests/ are byte-identical."""
    out = subprocess.run([*RENDER, "--no-render"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_crd_copies_are_the_operator_crds() -> None:
    for copy_dir in (CHART / "crds", MANIFESTS / "crds"):
        assert sorted(p.name for p in copy_dir.glob("*.yaml")) == sorted(p.name for p in OPERATOR_CRDS.glob("*.yaml"))
        for crd in OPERATOR_CRDS.glob("*.yaml"):
            assert (copy_dir / crd.name).read_bytes() == crd.read_bytes(), f"{copy_dir / crd.name} is stale"


@pytest.mark.helm
def test_manifests_are_the_chart_rendered_with_defaults() -> None:
    helm = require("helm3")
    out = subprocess.run(
        RENDER,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"HELM": helm, "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stdout + out.stderr


def kustomize_build() -> list[dict[str, Any]]:
    kubectl = require("kubectl")
    out = subprocess.run(
        [kubectl, "kustomize", str(MANIFESTS)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_kustomization_builds_the_operator_install() -> None:
    docs = kustomize_build()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == sorted(
        [
            ("Namespace", "ollama-guard"),
            ("CustomResourceDefinition", "guardproxies.ollama-guard.io"),
            ("CustomResourceDefinition", "scannodes.ollama-guard.io"),
            ("CustomResourceDefinition", "clusterkopfpeerings.kopf.dev"),
            ("ServiceAccount", "ollama-guard-operator"),
            ("ClusterRole", "ollama-guard-operator"),
            ("ClusterRoleBinding", "ollama-guard-operator"),
            ("Deployment", "ollama-guard-operator"),
        ]
    )
    for obj in docs:
        kubernetes_validate.validate(obj, "1.33", strict=True)
        assert "helm.sh/chart" not in obj["metadata"].get("labels", {})
        if obj["kind"] in ("ServiceAccount", "Deployment"):
            assert obj["metadata"]["namespace"] == "ollama-guard"


def test_every_plain_manifest_file_is_valid_kubernetes() -> None:
    files = [
        MANIFESTS / "namespace.yaml",
        MANIFESTS / "operator.yaml",
        *sorted((MANIFESTS / "crds").glob("*.yaml")),
    ]
    for path in files:
        for obj in yaml.safe_load_all(path.read_text()):
            if obj:
                kubernetes_validate.validate(obj, "1.33", strict=True)


def _schema(plural: str) -> dict[str, Any]:
    crd = load_yaml(OPERATOR_CRDS / f"{plural}.yaml")
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_examples_cover_the_documented_cases() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"guardproxy-minimal", "guardproxy-cuda-autoscaling", "scannode"} <= names
    cuda = load_yaml(MANIFESTS / "examples" / "guardproxy-cuda-autoscaling.yaml")["spec"]["variants"]
    assert cuda["cuda"]["enabled"] and cuda["cuda"]["gpuCount"] >= 1
    assert cuda["cuda"]["autoscaling"]["enabled"] and cuda["cuda"]["autoscaling"]["targetRequestsPerSecond"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_matches_the_crd_and_the_operator_model(path) -> None:
    from ollama_guard_operator.spec import GuardProxySpec, ScanNodeSpec

    obj = load_yaml(path)
    assert obj["apiVersion"] == "ollama-guard.io/v1alpha1"
    assert "namespace" not in obj["metadata"]  # applied with -n
    if obj["kind"] == "GuardProxy":
        jsonschema.validate(obj, _schema("guardproxies"))
        GuardProxySpec.model_validate(obj["spec"])
    elif obj["kind"] == "ScanNode":
        jsonschema.validate(obj, _schema("scannodes"))
        ScanNodeSpec.model_validate(obj["spec"])
    else:
        raise AssertionError(f"unexpected kind {obj['kind']}")


def test_scannode_example_joins_the_minimal_guardproxy() -> None:
    node = load_yaml(MANIFESTS / "examples" / "scannode.yaml")
    minimal = load_yaml(MANIFESTS / "examples" / "guardproxy-minimal.yaml")
    assert node["spec"]["guardProxy"] == minimal["metadata"]["name"]
