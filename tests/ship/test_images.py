"""Dockerfile and Dockerfile.macos: targets, non-root, CPU torch pinned, no torch in the operator, labels.

No container engine runs here, so the files are checked as text: the stages, what each one installs, and
that everything they COPY is in the build context (.dockerignore).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
MACOS = ROOT / "Dockerfile.macos"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]

    def text(self) -> str:
        return "\n".join(arg for _, arg in self.instructions)


def parse(path: Path) -> dict[str, Stage]:
    """Stages by name, with instructions (line continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, arg = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            words = arg.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"stage{len(stages)}"
            current = stages[name] = Stage(name, words[0])
        elif current is not None:
            current.instructions.append((op, arg))
    return stages


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """A stage and the stages it is built FROM, nearest first."""
    out = [stages[name]]
    while out[-1].base in stages:
        out.append(stages[out[-1].base])
    return out


def copied_from(stages: dict[str, Stage], name: str) -> list[Stage]:
    """Stages whose files reach this one through COPY --from, with their chains."""
    out: list[Stage] = []
    for stage in chain(stages, name):
        for arg in stage.all("COPY"):
            m = re.match(r"--from=(\S+)", arg)
            if m and m.group(1) in stages:
                out += chain(stages, m.group(1))
    return out


def effective(stages: dict[str, Stage], name: str, op: str) -> list[str]:
    return [arg for stage in chain(stages, name) for arg in stage.all(op)]


def test_targets_exist_and_proxy_is_the_default() -> None:
    stages = parse(DOCKERFILE)
    assert {"proxy", "operator"} <= set(stages)
    assert list(stages)[-1] == "proxy"  # `docker build .` without --target gives the proxy


@pytest.mark.parametrize("target", ["proxy", "operator"])
def test_runtime_stages_are_slim_non_root_labelled_and_health_checked(target: str) -> None:
    stages = parse(DOCKERFILE)
    root = chain(stages, target)[-1]
    assert root.base.startswith("${PYTHON_IMAGE}")
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", DOCKERFILE.read_text(), re.M)
    assert effective(stages, target, "USER")[0] == "10001:10001"
    assert "useradd --system --uid 10001 --gid 10001" in root.text()
    assert effective(stages, target, "HEALTHCHECK")
    labels = " ".join(effective(stages, target, "LABEL"))
    for key in ("title", "description", "source", "licenses", "version", "revision", "created"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert effective(stages, target, "ENTRYPOINT")
    # pip and the sources stay in the builder: runtime stages only COPY the venv.
    for arg in effective(stages, target, "COPY"):
        assert arg.startswith("--from=build-") and arg.endswith("/opt/venv /opt/venv"), arg


def test_proxy_installs_cpu_torch_first_then_the_proxy_extra_with_constraints() -> None:
    stages = parse(DOCKERFILE)
    runs = [arg for stage in reversed(copied_from(stages, "proxy")) for arg in stage.all("RUN")]
    torch_run = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    proxy_run = next(i for i, r in enumerate(runs) if "'.[proxy]'" in r)
    assert torch_run < proxy_run
    assert "-c constraints.txt" in runs[torch_run] and "-c constraints.txt" in runs[proxy_run]
    assert "--index-url" in runs[torch_run]
    assert re.search(r"ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu", DOCKERFILE.read_text())


def test_operator_carries_no_torch() -> None:
    stages = parse(DOCKERFILE)
    runs = " ".join(arg for stage in copied_from(stages, "operator") for arg in stage.all("RUN"))
    assert "'.[operator]'" in runs and "-c constraints.txt" in runs
    assert "torch" not in runs.replace('! python -c "import torch"', "")
    assert "'.[proxy]'" not in runs


def test_proxy_image_defaults_match_the_contract() -> None:
    stages = parse(DOCKERFILE)
    env = " ".join(effective(stages, "proxy", "ENV"))
    assert "MODELS_PATH=/models" in env and "PROXY_PORT=8080" in env
    assert effective(stages, "proxy", "EXPOSE") == ["8080"]
    assert effective(stages, "proxy", "CMD") == ['["serve"]']
    assert "/health" in effective(stages, "proxy", "HEALTHCHECK")[0]
    assert "8081/healthz" in effective(stages, "operator", "HEALTHCHECK")[0]  # kopf's liveness port


@pytest.mark.parametrize("path", [DOCKERFILE, MACOS], ids=lambda p: p.name)
def test_no_secret_is_baked_in(path: Path) -> None:
    for stage in parse(path).values():
        for op in ("ENV", "ARG"):
            for arg in stage.all(op):
                assert not re.search(r"(PASSWORD|TOKEN|SECRET|API_KEY)\w*=", arg, re.I), arg


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent folder covers its files."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pat[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pat) for prefix in prefixes)
        if hit:
            ignored = not negate
    return ignored


@pytest.mark.parametrize("path", [DOCKERFILE, MACOS], ids=lambda p: p.name)
def test_copied_sources_exist_and_are_in_the_build_context(path: Path) -> None:
    patterns = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    for stage in parse(path).values():
        for arg in stage.all("COPY"):
            if arg.startswith("--from"):
                continue
            *sources, _dest = arg.split()
            for src in sources:
                assert (ROOT / src).exists(), src
                assert not _ignored(src.rstrip("/"), patterns), f"{src} is excluded by .dockerignore"
    for heavy in (".venv", ".git", ".tools", "models", "tests"):
        assert _ignored(heavy, patterns), f"{heavy} would be sent to the build context"


def test_macos_image_is_arm64_cpu_and_says_why() -> None:
    text = MACOS.read_text()
    assert re.search(r"^FROM --platform=linux/arm64 ", text, re.M)
    assert "cannot reach the mps gpu" in text.replace("\n# ", " ").lower()
    stages = parse(MACOS)
    assert "proxy" in stages
    assert effective(stages, "proxy", "USER")[0] == "10001:10001"
    assert "LLM_GUARD_DEVICE=cpu" in " ".join(effective(stages, "proxy", "ENV"))
    assert effective(stages, "proxy", "HEALTHCHECK")
