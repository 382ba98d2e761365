"""docker-compose.yml (+ the macOS override): parses, references only files that exist, hardened."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT, load_yaml, tool

COMPOSE = ROOT / "docker-compose.yml"
MACOS = ROOT / "docker-compose.macos.yml"
ENV_EXAMPLE = ROOT / ".env.example"
# Services from images we do not build, run as the user their image expects.
HARDENED = ("proxy", "redis", "prometheus", "grafana")


def services() -> dict[str, Any]:
    return load_yaml(COMPOSE)["services"]


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def dockerfile_targets(path: Path) -> set[str]:
    return set(re.findall(r"^FROM\s+\S+(?:\s+\S+)*?\s+AS\s+(\S+)\s*$", path.read_text(), re.M | re.I))


def _bind_sources(svc: dict[str, Any]) -> list[str]:
    out = []
    for vol in svc.get("volumes", []):
        source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
        if source.startswith(("./", "../", "/")):
            out.append(source)
    return out


@pytest.mark.parametrize("path", [COMPOSE, MACOS], ids=lambda p: p.name)
def test_compose_file_references_only_existing_files(path: Path) -> None:
    for name, svc in load_yaml(path)["services"].items():
        build = svc.get("build")
        if build:
            context = ROOT / build.get("context", ".")
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            if "target" in build:
                assert build["target"] in dockerfile_targets(dockerfile), f"{name}: no stage {build['target']}"
        for source in _bind_sources(svc):
            assert (ROOT / source).exists(), f"{name}: bind mount source {source} missing"
        for env_file in svc.get("env_file", []):
            entry = env_file if isinstance(env_file, dict) else {"path": env_file, "required": True}
            assert not entry.get("required", True) or (ROOT / entry["path"]).exists()


def test_every_service_has_a_health_check() -> None:
    for name, svc in services().items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"


def test_services_are_non_root_read_only_and_without_privileges() -> None:
    svcs = services()
    for name in HARDENED:
        svc = svcs[name]
        user = str(svc.get("user", ""))
        assert user and not user.startswith(("0:", "root")) and user != "0", f"{name} runs as root"
        assert svc.get("read_only") is True, f"{name} root filesystem is writable"
        assert svc.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
    assert svcs["proxy"]["user"] == "10001:10001"  # the image's uid (docs/CONTRACTS.md)
    assert "/tmp" in svcs["proxy"]["tmpfs"]  # noqa: S108 (a tmpfs inside the container)


def test_ports_are_bound_to_localhost_unless_the_user_opts_in() -> None:
    assert env_example()["BIND_ADDRESS"] == "127.0.0.1"
    for name, svc in services().items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port}"


def test_no_secret_in_the_compose_file_and_passwords_are_required() -> None:
    text = COMPOSE.read_text()
    assert "${REDIS_PASSWORD:?" in text and "${GRAFANA_ADMIN_PASSWORD:?" in text
    assert env_example()["REDIS_PASSWORD"].startswith("change-me")  # a placeholder, not a real secret
    for name, svc in services().items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|TOKEN|SECRET|AUTH", key):
                assert str(value).startswith("${"), f"{name}: {key} is a literal secret"


def test_proxy_waits_for_healthy_redis_but_survives_it_going_away() -> None:
    proxy = services()["proxy"]
    dep = proxy["depends_on"]["redis"]
    assert dep["condition"] == "service_healthy"
    assert dep.get("restart") is False  # a Redis restart does not restart the proxy
    env = proxy["environment"]
    assert env["CACHE_BACKEND"] == "auto"  # falls back to the memory cache
    assert env["REDIS_HOST"] == "redis" and env["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD")


def test_redis_is_a_bounded_persistent_cache() -> None:
    redis = services()["redis"]
    command = " ".join(redis["command"])
    assert "--maxmemory 256mb" in command and "--maxmemory-policy allkeys-lru" in command
    assert "--requirepass" in command and "--save" in command
    assert any(v.startswith("redis-data:") for v in redis["volumes"])
    assert redis["mem_limit"]


def test_prometheus_and_grafana_get_the_project_files() -> None:
    svcs = services()
    prom = [v.split(":")[0] for v in svcs["prometheus"]["volumes"]]
    assert {"./deploy/prometheus/prometheus.yml", "./deploy/prometheus/alerts.yml"} <= set(prom)
    graf = [v.split(":")[0] for v in svcs["grafana"]["volumes"]]
    assert {
        "./deploy/grafana/provisioning/datasources",
        "./deploy/grafana/provisioning/dashboards",
        "./deploy/grafana/dashboards",
    } <= set(graf)


def test_ollama_is_optional_behind_a_profile_and_the_host_is_the_default() -> None:
    svcs = services()
    assert svcs["ollama"]["profiles"] == ["ollama"]
    assert "host.docker.internal" in svcs["proxy"]["environment"]["OLLAMA_URL"]
    assert "host.docker.internal:host-gateway" in svcs["proxy"]["extra_hosts"]


def test_macos_override_builds_the_arm64_image() -> None:
    proxy = load_yaml(MACOS)["services"]["proxy"]
    assert proxy["build"]["dockerfile"] == "Dockerfile.macos"
    assert proxy["platform"] == "linux/arm64"
    assert proxy["environment"]["LLM_GUARD_DEVICE"] == "cpu"  # no MPS inside containers


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    binary = tool("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (run: python scripts/fetch_tools.py)")
    return subprocess.run(
        [binary, "--project-directory", str(ROOT), "--env-file", str(ENV_EXAMPLE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "files",
    [("docker-compose.yml",), ("docker-compose.yml", "docker-compose.macos.yml")],
    ids=["linux", "macos"],
)
def test_docker_compose_config_accepts_the_files(files: tuple[str, ...]) -> None:
    args = [a for f in files for a in ("-f", str(ROOT / f))]
    out = _compose(*args, "--profile", "ollama", "config", "--format", "yaml")
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert set(resolved["services"]) == {"proxy", "redis", "prometheus", "grafana", "ollama"}
    ports = resolved["services"]["proxy"]["ports"]
    assert ports[0]["host_ip"] == "127.0.0.1" and ports[0]["published"] == "8080"


def test_docker_compose_refuses_to_start_without_passwords(tmp_path: Path) -> None:
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("")
    binary = tool("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (run: python scripts/fetch_tools.py)")
    out = subprocess.run(
        [
            binary,
            "--project-directory",
            str(ROOT),
            "--env-file",
            str(empty_env),
            "-f",
            str(COMPOSE),
            "config",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode != 0
    assert "PASSWORD" in out.stderr
