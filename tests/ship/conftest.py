"""Packaging tests: the chart, the manifests, the images, compose, Prometheus/Grafana files, the macOS runner.

Tools come from scripts/fetch_tools.py (``.tools/bin``, put on PATH by ``make test``); a test that needs a
missing binary skips and says which.
"""

from __future__ import annotations

import functools
import pathlib
import shutil
import subprocess
import sys
from typing import Any

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ollama-guard"
VALUES = pathlib.Path(__file__).resolve().parent / "values"
TOOLS_BIN = ROOT / ".tools" / "bin"

# The packages, importable from a bare checkout too (before `make install-all` installs them editable).
for package, source in (("ollama_guard_operator", "operator"), ("ollama_guard", "proxy")):
    try:
        __import__(package)
    except ImportError:
        sys.path.insert(0, str(ROOT / source))


def tool(name: str) -> str | None:
    """A binary from .tools/bin, else from PATH."""
    local = TOOLS_BIN / name
    if local.is_file():
        return str(local)
    return shutil.which(name)


def require(name: str) -> str:
    path = tool(name)
    if path is None:
        pytest.skip(f"{name} not installed (run: python scripts/fetch_tools.py)")
    return path


HELMS = ("helm3", "helm4")


@pytest.fixture(params=HELMS)
def helm(request: pytest.FixtureRequest) -> str:
    """Each helm test runs on helm 3 and on helm 4."""
    return require(request.param)


@functools.cache
def _template(helm: str, args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, "template", *args], capture_output=True, text=True, timeout=60, check=False)


def template(
    helm: str, *values: str, release: str = "og", namespace: str = "guard", extra: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Render the chart (CRDs and test hooks included) with tests/ship/values/<name>.yaml files."""
    args: list[str] = [release, str(CHART), "--namespace", namespace, "--include-crds", *extra]
    for name in values:
        args += ["-f", str(VALUES / f"{name}.yaml")]
    out = _template(helm, tuple(args))
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def template_fails(helm: str, *args: str) -> str:
    """Render with raw helm args that must fail; return helm's error text."""
    out = _template(helm, ("og", str(CHART), "--namespace", "guard", *args))
    assert out.returncode != 0, f"helm template accepted {args}"
    return out.stderr


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def load_yaml(path: pathlib.Path) -> Any:
    return yaml.safe_load(path.read_text())


def helm_notes(tmp_path: pathlib.Path, *args: str) -> str:
    """NOTES.txt as `helm install` prints it. A client-side dry run needs no cluster on helm 4 (helm 3.17
    still asks for one), so NOTES are rendered with helm 4; `helm lint` checks them on both."""
    helm = require("helm4")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")}
    out = subprocess.run(
        [helm, "install", "og", str(CHART), "--namespace", "guard", "--dry-run=client", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split("NOTES:", 1)[1]
