"""Every command in the README is run here (the deployment walk-throughs live in docs/DEPLOY.md, checked by
tests/ship/test_docs.py)."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def commands() -> list[str]:
    out = []
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line:
                out.append(line)
    return out


def test_the_readme_commands_are_the_ones_tested_here():
    assert commands() == [
        "make serve",
        "make test",
        'make serve ARGS="--ollama-url http://localhost:11434"',
        'curl -s localhost:8080/api/chat -d \'{"model":"llama3.2","messages":[{"role":"user","content":"hello"}]}\'',
        '.venv/bin/ollama-guard scan "my key is AKIAIOSFODNN7EXAMPLE"',
        ".venv/bin/ollama-guard config check",
        ".venv/bin/ollama-guard models pull",
    ]


def _cli(line: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = shlex.split(line)
    argv[0] = str(VENV_BIN / "ollama-guard")
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, **(env or {})}
    )


def test_scan_command():
    out = _cli('.venv/bin/ollama-guard scan "my key is AKIAIOSFODNN7EXAMPLE"')
    assert out.returncode == 0 and "verdict: SANITIZED" in out.stdout and "my key is ******" in out.stdout


def test_config_check_command():
    out = _cli(".venv/bin/ollama-guard config check")
    assert out.returncode == 0 and "config OK" in out.stdout and "ok       input/Secrets" in out.stdout


def test_models_pull_command_offline_is_clear(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    out = _cli(".venv/bin/ollama-guard models pull", {"HF_ENDPOINT": dead, "MODELS_PATH": str(tmp_path)})
    assert out.returncode == 1 and "cannot reach the Hugging Face hub" in out.stderr


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "ollama-guard").exists(), reason="needs the Makefile's .venv")
def test_make_serve_then_curl(upstream):
    # The README's command, with the port moved off 8080 so the test never collides with a running proxy.
    port = free_port()
    proc = subprocess.Popen(
        ["make", "-s", "serve", f"ARGS=--ollama-url {upstream.url} --port {port}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def up():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        wait_for(up, 120, "make serve")
        assert proc.poll() is None
        curl = subprocess.run(
            [
                "curl",
                "-s",
                f"localhost:{port}/api/chat",
                "-d",
                '{"model":"llama3.2","messages":[{"role":"user","content":"hello"}]}',
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        lines = [json.loads(line) for line in curl.stdout.splitlines() if line.strip()]
        assert lines[-1]["done"] is True
        assert "Paris" in "".join(line["message"]["content"] for line in lines)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(20)
