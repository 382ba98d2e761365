"""The e2e files: the kind runner skips cleanly without a container engine; its manifests are valid."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

from .conftest import ROOT, load_yaml, require

RUNNER = ROOT / "e2e" / "run_kind.sh"
KIND = ROOT / "e2e" / "kind"


def test_runner_parses_and_is_shellcheck_clean() -> None:
    assert subprocess.run(["bash", "-n", str(RUNNER)], check=False).returncode == 0
    assert os.access(RUNNER, os.X_OK)
    out = subprocess.run([require("shellcheck"), str(RUNNER)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout


def test_runner_skips_cleanly_when_docker_has_no_daemon(tmp_path: Path) -> None:
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {
        "PATH": f"{tmp_path}:{require('kubectl').rsplit('/', 1)[0]}:{require('helm3').rsplit('/', 1)[0]}:/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    if not Path(require("helm3")).with_name("helm").exists():
        (tmp_path / "helm").symlink_to(require("helm3"))
    out = subprocess.run([str(RUNNER)], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("SKIP: docker has no daemon"), out.stdout


def test_fake_ollama_manifest_is_valid_kubernetes() -> None:
    for obj in yaml.safe_load_all((KIND / "fake-ollama.yaml").read_text()):
        kubernetes_validate.validate(obj, "1.33", strict=True)


def test_e2e_guardproxy_is_valid_and_guards_the_fake_ollama() -> None:
    from ollama_guard_operator.spec import GuardProxySpec

    gp = load_yaml(KIND / "guardproxy.yaml")
    crd = load_yaml(ROOT / "operator" / "ollama_guard_operator" / "crds" / "guardproxies.yaml")
    jsonschema.validate(gp, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    GuardProxySpec.model_validate(gp["spec"])
    assert gp["spec"]["upstream"]["url"] == "http://fake-ollama:11434"
    banned = gp["spec"]["config"]["input_scanners"][0]["params"]["substrings"]
    assert "E2E-FORBIDDEN-WORD" in banned


def test_e2e_guardproxy_uses_the_secrets_the_chart_generates() -> None:
    """The e2e renders the chart's auth Secrets with fullnameOverride=e2e-guard; the GuardProxy names them."""
    out = subprocess.run(
        [
            require("helm3"),
            "template",
            "og-e2e",
            str(ROOT / "charts" / "ollama-guard"),
            "--show-only",
            "templates/guardproxy-auth.yaml",
            "--set",
            "guardProxy.enabled=true",
            "--set",
            "fullnameOverride=e2e-guard",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all(out.stdout) if d}
    assert set(secrets) == {"e2e-guard-api-key", "e2e-guard-api-keys"}
    ref = load_yaml(KIND / "guardproxy.yaml")["spec"]["auth"]["apiKeysSecret"]
    assert ref["key"] in secrets[ref["name"]]["data"]
    e2e = (ROOT / "e2e" / "test_chart_cluster.py").read_text()
    assert '"templates/guardproxy-auth.yaml"' in e2e and '"jsonpath={.data.key}"' in e2e
