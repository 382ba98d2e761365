"""docs/DEPLOY.md: every shell command in it is checked here or run by the e2e (no command goes unchecked).

helm installs of our chart are rendered with the same flags, compose commands are resolved by
`docker compose config` with the same files and profiles, kubectl commands name files and objects that
exist, and the rest name real targets, commands and files.
"""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
import yaml

from .conftest import CHART, ROOT, load_yaml, require, tool

DOC = ROOT / "docs" / "DEPLOY.md"
E2E = (ROOT / "e2e" / "run_kind.sh").read_text() + (ROOT / "e2e" / "test_chart_cluster.py").read_text()
EXAMPLES = {load_yaml(p)["metadata"]["name"]: load_yaml(p) for p in (ROOT / "manifests" / "examples").glob("*.yaml")}


def commands() -> list[list[str]]:
    out = []
    for block in re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                out.append(shlex.split(line))
    return out


COMMANDS = commands()


def guardproxy_names() -> set[str]:
    names = {n for n, obj in EXAMPLES.items() if obj["kind"] == "GuardProxy"}
    for cmd in COMMANDS:
        names |= {a.split("=", 1)[1] for a in cmd if a.startswith("guardProxy.name=")}
    return names


def operator_deployment() -> str:
    docs = [d for d in yaml.safe_load_all((ROOT / "manifests" / "operator.yaml").read_text()) if d]
    return next(d["metadata"]["name"] for d in docs if d["kind"] == "Deployment")


def strip_namespace(cmd: list[str]) -> list[str]:
    out, skip = [], False
    for arg in cmd:
        if skip:
            skip = False
        elif arg in ("-n", "--namespace"):
            skip = True
        else:
            out.append(arg)
    return out


def check_helm(cmd: list[str]) -> None:
    if cmd[1] == "repo":
        assert " ".join(cmd) in E2E
        return
    if cmd[1] == "test":
        assert '"test", RELEASE' in E2E
        return
    args = cmd[2:] if cmd[1] == "install" else cmd[3:]
    assert cmd[1] == "install" or cmd[1:3] == ["upgrade", "--install"], cmd
    release, chart, *flags = args
    if chart == "prometheus-community/prometheus-adapter":
        assert f"helm upgrade --install {release} {chart}" in E2E
        values = flags[flags.index("-f") + 1]
        assert (ROOT / values).is_file()
        return
    assert chart == "charts/ollama-guard", cmd
    render_documented(release, flags)


def render_documented(release: str, flags: list[str]) -> str:
    """`helm template` of a documented install of our chart (flags that need a cluster dropped)."""
    flags = [f for f in flags if f not in ("--create-namespace", "--wait")]
    out = subprocess.run(
        [require("helm3"), "template", release, str(CHART), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def documented_chart_secrets() -> dict[str, dict[str, str]]:
    """The Secrets (name -> data) that the documented helm installs of our chart render."""
    found: dict[str, dict[str, str]] = {}
    for cmd in COMMANDS:
        if cmd[0] != "helm" or "charts/ollama-guard" not in cmd:
            continue
        args = cmd[cmd.index("charts/ollama-guard") + 1 :]
        release = cmd[cmd.index("charts/ollama-guard") - 1]
        for doc in yaml.safe_load_all(render_documented(release, args)):
            if doc and doc["kind"] == "Secret":
                found[doc["metadata"]["name"]] = doc["data"]
    return found


def check_kubectl(cmd: list[str]) -> None:
    args = strip_namespace(cmd[1:])
    verb = args[0]
    if verb == "apply":
        if "-k" in args:
            target = args[args.index("-k") + 1]
            kubectl = require("kubectl")
            assert (
                subprocess.run([kubectl, "kustomize", str(ROOT / target)], capture_output=True, check=False).returncode
                == 0
            )
        else:
            assert (ROOT / args[args.index("-f") + 1]).exists()
    elif verb == "wait":
        kind, name = args[1].split("/")
        assert kind == "guardproxy" and name in guardproxy_names(), args
        assert "--for=condition=Ready" in args
    elif verb == "rollout":
        assert args[1] == "status" and args[2] == f"deployment/{operator_deployment()}"
    elif verb == "port-forward":
        assert args[1].removeprefix("service/") in guardproxy_names()
    elif verb == "get" and args[1] == "crd":
        crds = {load_yaml(p)["metadata"]["name"] for p in (ROOT / "operator/ollama_guard_operator/crds").glob("*.yaml")}
        assert set(args[2:]) <= crds
    elif verb == "get" and args[1] == "--raw":
        path = args[2]
        metric = load_yaml(ROOT / "deploy/prometheus/adapter-rules.yaml")["rules"][0]["name"]["as"]
        assert path == "/apis/custom.metrics.k8s.io/v1beta1" or path.endswith(f"/pods/*/{metric}")
        assert "custom.metrics.k8s.io/v1beta1" in E2E
    elif verb == "get" and args[1] == "secret":
        # The key the chart generates, read as the e2e reads it (jsonpath, then base64).
        name, output = args[2], args[args.index("-o") + 1]
        key = re.fullmatch(r"jsonpath=\{\.data\.([\w.-]+)\}", output)
        assert key, output
        secrets = documented_chart_secrets()
        assert name in secrets and key.group(1) in secrets[name], (name, sorted(secrets))
        assert f'"{output}"' in E2E
    elif verb == "get":
        assert args[1] in ("guardproxies", "scannodes", "hpa"), args
    else:
        raise AssertionError(f"unchecked kubectl command: {cmd}")


def check_compose(cmd: list[str]) -> None:
    args = cmd[2:]
    files = [args[i + 1] for i, a in enumerate(args) if a == "-f"] or ["docker-compose.yml"]
    profiles = [args[i + 1] for i, a in enumerate(args) if a == "--profile"]
    binary = tool("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed")
    resolve = [binary, "--project-directory", str(ROOT), "--env-file", str(ROOT / ".env.example")]
    for f in files:
        resolve += ["-f", str(ROOT / f)]
    for p in profiles:
        resolve += ["--profile", p]
    out = subprocess.run([*resolve, "config", "-q"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr


def check(cmd: list[str]) -> None:
    prog = cmd[0]
    if prog == "helm":
        check_helm(cmd)
    elif prog == "kubectl":
        check_kubectl(cmd)
    elif prog == "docker" and cmd[1] == "compose":
        check_compose(cmd)
    elif prog == "docker" and cmd[1] == "build":
        target = cmd[cmd.index("--target") + 1]
        assert re.search(rf"^FROM .* AS {target}$", (ROOT / "Dockerfile").read_text(), re.M)
        image = cmd[cmd.index("-t") + 1]
        expected = {
            "proxy": "ghcr.io/ollama-guard/ollama-guard:",
            "operator": "ghcr.io/ollama-guard/ollama-guard-operator:",
        }
        assert image.startswith(expected[target])
    elif re.match(r"^[A-Z_]+=\$\(", prog):
        # NAME=$(command | base64 -d): the command is checked, the pipe only decodes.
        assert cmd[-1].endswith(")"), cmd
        inner = [prog.split("$(", 1)[1], *cmd[1:-1], cmd[-1].removesuffix(")")]
        pipeline: list[list[str]] = [[]]
        for arg in inner:
            if arg == "|":
                pipeline.append([])
            else:
                pipeline[-1].append(arg)
        first, *rest = pipeline
        assert rest == [["base64", "-d"]], rest
        check(first)
    elif prog == "curl":
        url = next(a for a in cmd if a.startswith("http"))
        assert re.match(r"http://127\.0\.0\.1:8080/(health|api/chat)$", url), url
        for header in (cmd[i + 1] for i, a in enumerate(cmd) if a == "-H"):
            # The key the doc reads into KEY just before.
            assert header == "Authorization: Bearer $KEY", header
            assert any(c[0].startswith("KEY=$(") for c in COMMANDS)
    elif prog == "./run_proxy_macos.sh" or (prog.startswith("PROXY_HOST=") and cmd[1] == "./run_proxy_macos.sh"):
        sub = cmd[1] if prog == "./run_proxy_macos.sh" else cmd[2]
        assert (
            f"  {sub})" in (ROOT / "run_proxy_macos.sh").read_text()
            or f"    {sub})" in (ROOT / "run_proxy_macos.sh").read_text()
        ), sub
    elif prog == "make":
        assert re.search(rf"^{cmd[1]}:", (ROOT / "Makefile").read_text(), re.M), cmd
    elif prog == "e2e/run_kind.sh":
        assert (ROOT / prog).is_file()
    elif prog == "git" and cmd[1] == "clone":
        assert cmd[2].endswith("/ollama-guard.git")
    elif prog == "cd":
        assert cmd[1] == "ollama-guard"
    elif prog == "cp":
        assert cmd[1:] == [".env.example", ".env"] and (ROOT / ".env.example").is_file()
    else:
        raise AssertionError(f"no check for the documented command: {shlex.join(cmd)}")


def test_the_doc_has_commands() -> None:
    assert len(COMMANDS) > 20


@pytest.mark.parametrize(
    "cmd",
    [pytest.param(c, marks=[pytest.mark.helm] if c[0] == "helm" else []) for c in COMMANDS],
    ids=lambda c: shlex.join(c)[:80],
)
def test_documented_command_is_checked(cmd: list[str]) -> None:
    check(cmd)


def test_doc_says_mps_is_native_only() -> None:
    text = DOC.read_text()
    assert "The MPS GPU is used only by the native runner" in text


def test_paths_named_in_the_doc_exist() -> None:
    for path in re.findall(r"`((?:charts|manifests|deploy|docs|e2e|scripts|operator)/[\w./-]+)`", DOC.read_text()):
        assert (ROOT / path.rstrip("/")).exists(), path
    for path in ("Dockerfile", "Dockerfile.macos", "docker-compose.yml", "docker-compose.macos.yml"):
        assert path in DOC.read_text() and (ROOT / path).is_file()


def test_notes_name_the_operator_deployment() -> None:
    """The chart's NOTES.txt use the same names the doc does."""
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    assert 'deployment/{{ include "ollama-guard.operatorName" . }}' in notes
    assert operator_deployment() == "ollama-guard-operator"
