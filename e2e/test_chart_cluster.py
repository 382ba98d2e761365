"""The Helm chart on a real cluster: installs, CRDs established, a GuardProxy reconciled with status set,
and (with the images in the cluster, E2E_DATA_PLANE=1) allowed and blocked requests through its Service,
authenticated with the API key the chart generates (its Secrets rendered by the chart and applied first).

Runs against any cluster KUBECONFIG names; skipped when none answers within a few seconds.
e2e/run_kind.sh makes a kind cluster, builds and loads the images, and runs this with E2E_DATA_PLANE=1.

Environment: E2E_NAMESPACE (ollama-guard-e2e), E2E_RELEASE (og-e2e), E2E_IMAGE_TAG (operator and proxy image
tag; default the chart's appVersion), E2E_IMAGE_REGISTRY (default ghcr.io/ollama-guard), E2E_DATA_PLANE=1,
E2E_KEEP=1 (leave everything installed).
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.cluster

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "ollama-guard"
KIND_DIR = pathlib.Path(__file__).resolve().parent / "kind"
NAMESPACE = os.environ.get("E2E_NAMESPACE", "ollama-guard-e2e")
RELEASE = os.environ.get("E2E_RELEASE", "og-e2e")
REGISTRY = os.environ.get("E2E_IMAGE_REGISTRY", "ghcr.io/ollama-guard")
IMAGE_TAG = os.environ.get("E2E_IMAGE_TAG", "")
DATA_PLANE = os.environ.get("E2E_DATA_PLANE") == "1"
KEEP = os.environ.get("E2E_KEEP") == "1"
GUARD = "e2e-guard"
BANNED = "E2E-FORBIDDEN-WORD"


def _binary(name: str, *alternatives: str) -> str | None:
    for candidate in (name, *alternatives):
        local = ROOT / ".tools" / "bin" / candidate
        if local.is_file():
            return str(local)
        found = shutil.which(candidate)
        if found:
            return found
    return None


KUBECTL = _binary("kubectl")
HELM = os.environ.get("HELM") or _binary("helm", "helm3", "helm4")


def kubectl(*args: str, check: bool = True, timeout: float = 120, stdin: str | None = None) -> str:
    assert KUBECTL
    out = subprocess.run([KUBECTL, *args], capture_output=True, text=True, timeout=timeout, input=stdin, check=False)
    if check:
        assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
    return out.stdout


def helm(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    assert HELM
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=timeout, check=False)


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 2.0) -> Any:
    """Poll probe until it returns something truthy; fail with the last value after timeout seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def cluster_reachable() -> str | None:
    """None when a cluster answers, else why not."""
    if KUBECTL is None:
        return "kubectl not installed (python scripts/fetch_tools.py fetches one)"
    if HELM is None:
        return "helm not installed (python scripts/fetch_tools.py)"
    if not os.environ.get("KUBECONFIG") and not (pathlib.Path.home() / ".kube" / "config").exists():
        return "no KUBECONFIG and no ~/.kube/config"
    try:
        out = subprocess.run(
            [KUBECTL, "get", "--raw", "/readyz", "--request-timeout=5s"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "the cluster did not answer within 10s"
    if out.returncode != 0:
        return f"the cluster is not reachable: {out.stderr.strip()[:200]}"
    return None


def schedulable_node() -> str | None:
    """None when some node is Ready and schedulable (so the operator's pod can start), else why not."""
    nodes = json.loads(kubectl("get", "nodes", "-o", "json", check=False) or "{}").get("items") or []
    for node in nodes:
        ready = any(
            c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions") or []
        )
        no_schedule = any(t.get("effect") == "NoSchedule" for t in node.get("spec", {}).get("taints") or [])
        if ready and not node.get("spec", {}).get("unschedulable") and not no_schedule:
            return None
    return f"no Ready, schedulable node among {len(nodes)}: pods cannot start here"


def cluster_dns() -> str | None:
    """None when the cluster has a DNS Service (pods reach Services by name), else why not."""
    found = kubectl("get", "service", "-n", "kube-system", "-l", "k8s-app=kube-dns", "-o", "name", check=False)
    return None if found.strip() else "no kube-dns Service in kube-system: pods cannot resolve Service names"


@pytest.fixture(scope="module")
def pods_run(installed: None) -> None:
    """Tests that need a running pod (the operator's) say so; on a cluster without a schedulable node they
    skip instead of waiting out a timeout."""
    why = schedulable_node()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def installed() -> Iterator[None]:
    """The chart installed in NAMESPACE, with the e2e image tag and a helm test URL for the e2e GuardProxy."""
    why = cluster_reachable()
    if why:
        pytest.skip(why)
    args = [
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--create-namespace",
        # No --wait: the CRDs and RBAC can be checked on any cluster; tests that need the operator's pod
        # running wait for it themselves (pods_run) and skip where no pod can start.
        "--timeout",
        "5m",
        "--set",
        f"operator.image.repository={REGISTRY}/ollama-guard-operator",
        "--set",
        f"tests.url=http://{GUARD}.{NAMESPACE}.svc:8080/health",
    ]
    if IMAGE_TAG:
        args += [
            "--set",
            f"operator.image.tag={IMAGE_TAG}",
            "--set",
            "operator.image.pullPolicy=IfNotPresent",
        ]
    out = helm(*args)
    assert out.returncode == 0, out.stderr
    yield
    if not KEEP:
        kubectl("delete", "guardproxy", GUARD, "-n", NAMESPACE, "--ignore-not-found", "--wait=true", check=False)
        helm("uninstall", RELEASE, "--namespace", NAMESPACE, "--wait", "--timeout", "2m")
        kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=false", check=False)


def _auth_secrets() -> str:
    """The chart's generated API-key Secrets for a release whose fullname is the e2e GuardProxy's name."""
    out = helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--show-only",
        "templates/guardproxy-auth.yaml",
        "--set",
        "guardProxy.enabled=true",
        "--set",
        f"fullnameOverride={GUARD}",
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _manifest(name: str) -> str:
    docs = list(yaml.safe_load_all((KIND_DIR / name).read_text()))
    for doc in docs:
        if doc["kind"] == "GuardProxy" and IMAGE_TAG:
            doc["spec"]["image"]["tag"] = IMAGE_TAG
            doc["spec"]["image"]["repository"] = f"{REGISTRY}/ollama-guard"
        if doc["kind"] == "Deployment" and IMAGE_TAG:
            container = doc["spec"]["template"]["spec"]["containers"][0]
            container["image"] = f"{REGISTRY}/ollama-guard:{IMAGE_TAG}"
    return yaml.safe_dump_all(docs)


@pytest.fixture(scope="module")
def guardproxy(pods_run: None) -> dict[str, Any]:
    """The e2e GuardProxy (and the fake Ollama it guards), returned once the operator has set its status."""
    if DATA_PLANE:
        kubectl("apply", "-n", NAMESPACE, "-f", "-", stdin=_manifest("fake-ollama.yaml"))
    # create, not apply: the key stays the same when an E2E_KEEP=1 run is repeated
    if not kubectl("get", "secret", f"{GUARD}-api-key", "-n", NAMESPACE, "--ignore-not-found", "-o", "name"):
        kubectl("create", "-n", NAMESPACE, "-f", "-", stdin=_auth_secrets())
    kubectl("apply", "-n", NAMESPACE, "-f", "-", stdin=_manifest("guardproxy.yaml"))

    def reconciled() -> dict[str, Any] | None:
        obj = json.loads(kubectl("get", "guardproxy", GUARD, "-n", NAMESPACE, "-o", "json"))
        status = obj.get("status", {})
        if status.get("conditions") and status.get("observedGeneration") == obj["metadata"]["generation"]:
            return obj
        return None

    return wait_for("the operator to reconcile the GuardProxy and set its status", reconciled, timeout=180)


def test_operator_is_available(pods_run: None) -> None:
    def available() -> dict[str, Any] | None:
        deployments = json.loads(
            kubectl("get", "deployments", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=operator", "-o", "json")
        )["items"]
        assert len(deployments) == 1
        status = deployments[0].get("status") or {}
        return status if status.get("availableReplicas", 0) >= 1 else None

    wait_for("the operator Deployment to be available", available, timeout=300, interval=3)


def test_crds_are_established(installed: None) -> None:
    for crd in ("guardproxies.ollama-guard.io", "scannodes.ollama-guard.io"):
        kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
    names = kubectl("api-resources", "--api-group=ollama-guard.io", "-o", "name").split()
    assert {"guardproxies.ollama-guard.io", "scannodes.ollama-guard.io"} <= set(names)


def test_guardproxy_is_reconciled_and_its_status_set(guardproxy: dict[str, Any]) -> None:
    types = {c["type"] for c in guardproxy["status"]["conditions"]}
    assert "Ready" in types
    selector = f"ollama-guard.io/guardproxy={GUARD}"
    deployments = json.loads(kubectl("get", "deployments", "-n", NAMESPACE, "-l", selector, "-o", "json"))["items"]
    assert deployments, "the operator created no Deployment for the GuardProxy"
    for dep in deployments:
        assert dep["metadata"]["ownerReferences"][0]["kind"] == "GuardProxy"
    service = json.loads(kubectl("get", "service", GUARD, "-n", NAMESPACE, "-o", "json"))
    assert service["spec"]["ports"][0]["port"] == 8080


class PortForward:
    """kubectl port-forward to a Service on a free local port."""

    def __init__(self, target: str, port: int) -> None:
        assert KUBECTL
        self.proc = subprocess.Popen(
            [KUBECTL, "port-forward", "-n", NAMESPACE, target, f"0:{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.local_port: int | None = None
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        reader.join(timeout=30)
        if self.local_port is None:
            self.close()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            pytest.fail(f"kubectl port-forward {target} did not start: {err}")

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:  # "Forwarding from 127.0.0.1:43567 -> 8080"
            if line.startswith("Forwarding from 127.0.0.1:"):
                self.local_port = int(line.split(":")[1].split()[0])
                return

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def api_key() -> str:
    """The generated key, read back as docs/DEPLOY.md does:
    kubectl get secret <fullname>-api-key -o jsonpath='{.data.key}' | base64 -d"""
    encoded = kubectl("-n", NAMESPACE, "get", "secret", f"{GUARD}-api-key", "-o", "jsonpath={.data.key}")
    return base64.b64decode(encoded).decode()


def post(url: str, body: dict[str, Any], key: str | None = None) -> tuple[int, dict[str, Any]]:
    """POST through the port-forward, with the generated API key unless key is "" (none sent)."""
    assert url.startswith("http://127.0.0.1:")  # a local port-forward
    headers = {"Content-Type": "application/json"}
    key = api_key() if key is None else key
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 (http to a local port-forward)
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def proxy_url(guardproxy: dict[str, Any]) -> Iterator[str]:
    if not DATA_PLANE:
        pytest.skip("E2E_DATA_PLANE=1 not set: the proxy image may not be in this cluster")
    why = cluster_dns()
    if why:
        pytest.skip(why)

    def ready() -> bool:
        obj = json.loads(kubectl("get", "guardproxy", GUARD, "-n", NAMESPACE, "-o", "json"))
        return any(c["type"] == "Ready" and c["status"] == "True" for c in obj.get("status", {}).get("conditions", []))

    wait_for("the GuardProxy to become Ready", ready, timeout=600, interval=5)
    forward = PortForward(f"service/{GUARD}", 8080)
    try:
        yield f"http://127.0.0.1:{forward.local_port}"
    finally:
        forward.close()


def test_health_through_the_service(proxy_url: str) -> None:
    with urllib.request.urlopen(f"{proxy_url}/health", timeout=10) as resp:  # noqa: S310
        assert resp.status == 200
        assert json.loads(resp.read())["status"] == "ok"


def test_allowed_request_reaches_ollama(proxy_url: str) -> None:
    status, body = post(
        f"{proxy_url}/api/chat",
        {
            "model": "llama3.2",
            "stream": False,
            "messages": [{"role": "user", "content": "REPLY: hello from the cluster"}],
        },
    )
    assert status == 200, body
    assert body["message"]["content"] == "hello from the cluster"


def test_request_without_a_valid_key_is_refused(proxy_url: str) -> None:
    body = {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "REPLY: no"}]}
    for key in ("", "og-not-the-key"):
        status, answer = post(f"{proxy_url}/api/chat", body, key=key)
        assert status == 401, answer


def test_blocked_request_is_refused(proxy_url: str) -> None:
    status, body = post(
        f"{proxy_url}/api/chat",
        {
            "model": "llama3.2",
            "stream": False,
            "messages": [{"role": "user", "content": f"please say {BANNED}"}],
        },
    )
    assert status == 403, body


def test_openai_dialect_through_the_service(proxy_url: str) -> None:
    status, body = post(
        f"{proxy_url}/v1/chat/completions",
        {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "REPLY: openai ok"}],
        },
    )
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "openai ok"


def test_helm_test_hook_passes(proxy_url: str) -> None:
    out = helm("test", RELEASE, "--namespace", NAMESPACE, "--timeout", "5m")
    assert out.returncode == 0, out.stdout + out.stderr
