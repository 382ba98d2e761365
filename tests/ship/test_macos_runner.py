"""run_proxy_macos.sh: syntax, shellcheck, and its behaviour with a stand-in `ollama-guard` on real HTTP.

On Linux the script must refuse launchd commands plainly and still run the proxy on the CPU; its macOS
branch is exercised with stand-ins for uname/sysctl/launchctl/plutil and for the torch MPS probe.
"""

from __future__ import annotations

import json
import os
import plistlib
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import ROOT, require

SCRIPT = ROOT / "run_proxy_macos.sh"

# A stand-in for `ollama-guard`: `serve` answers /health on PROXY_PORT and records its environment;
# `node ...` records its argv.
FAKE_PROXY = textwrap.dedent(
    """
    import json, os, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    record = os.environ["FAKE_RECORD"]
    if sys.argv[1:2] == ["node"]:
        json.dump({"argv": sys.argv[1:]}, open(record, "w"))
        sys.exit(0)
    if os.environ.get("FAKE_CRASH"):
        sys.exit(4)
    keys = ["PYTORCH_ENABLE_MPS_FALLBACK", "MPS_ENABLE_FP16", "LLM_GUARD_DEVICE", "PROXY_HOST", "PROXY_PORT",
            "OLLAMA_URL"]
    json.dump({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}, open(record, "w"))
    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"status": "ok", "device": os.environ["LLM_GUARD_DEVICE"]}).encode()
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    HTTPServer((os.environ["PROXY_HOST"], int(os.environ["PROXY_PORT"])), Health).serve_forever()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    fake = write_exe(tmp_path / "ollama-guard", f"#!{sys.executable}\n{FAKE_PROXY}")
    home = tmp_path / "home"
    home.mkdir()
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "OLLAMA_GUARD_BIN": str(fake),
        "OLLAMA_GUARD_STATE_DIR": str(tmp_path / "state"),
        "OLLAMA_GUARD_START_TIMEOUT": "30",
        "PROXY_PORT": str(free_port()),
        "FAKE_RECORD": str(tmp_path / "record.json"),
    }


@pytest.fixture
def fake_mac(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """Stand-ins that make the script believe it runs on an Apple Silicon Mac with MPS."""
    bin_dir = tmp_path / "macbin"
    bin_dir.mkdir()
    calls = tmp_path / "launchctl.log"
    write_exe(
        bin_dir / "uname",
        '#!/bin/sh\ncase "$1" in -s) echo Darwin;; -m) echo arm64;; *) echo Darwin;; esac\n',
    )
    write_exe(bin_dir / "sysctl", "#!/bin/sh\necho 1\n")
    write_exe(bin_dir / "plutil", "#!/bin/sh\nexit 0\n")
    # `launchctl print` says "not loaded"; everything else is recorded.
    write_exe(bin_dir / "launchctl", f'#!/bin/sh\n[ "$1" = print ] && exit 113\necho "$@" >> {calls}\n')
    # The MPS probe: a python whose torch says MPS is available.
    write_exe(bin_dir / "python-mps", "#!/bin/sh\nexit 0\n")
    return {
        **env,
        "PATH": f"{bin_dir}:{env['PATH']}",
        "OLLAMA_GUARD_PYTHON": str(bin_dir / "python-mps"),
        "LAUNCHCTL_LOG": str(calls),
    }


def run(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def test_script_parses() -> None:
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert os.access(SCRIPT, os.X_OK)


def test_shellcheck_is_clean() -> None:
    out = subprocess.run([require("shellcheck"), str(SCRIPT)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout


def test_help_lists_every_command(env: dict[str, str]) -> None:
    out = run(env, "help")
    assert out.returncode == 0
    for cmd in ("detect", "run", "start", "stop", "status", "install", "uninstall", "register"):
        assert f"run_proxy_macos.sh {cmd}" in out.stdout, cmd


def test_unknown_command_fails(env: dict[str, str]) -> None:
    out = run(env, "frobnicate")
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_status_when_not_running(env: dict[str, str]) -> None:
    out = run(env, "status")
    assert out.returncode == 3
    assert out.stdout.strip() == "not running"


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the refusal off macOS")
@pytest.mark.parametrize("command", ["install", "uninstall"])
def test_launchd_commands_refuse_plainly_off_macos(env: dict[str, str], command: str) -> None:
    out = run(env, command)
    assert out.returncode == 2
    assert "works on macOS only" in out.stderr
    assert not (Path(env["HOME"]) / "Library").exists()


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-mac detection")
def test_detect_off_macos_chooses_cpu(env: dict[str, str]) -> None:
    out = run(env, "detect")
    assert out.returncode == 0, out.stderr
    assert "apple_silicon: no" in out.stdout and "mps: unavailable" in out.stdout
    assert "device: cpu" in out.stdout and "PYTORCH_ENABLE_MPS_FALLBACK=1" in out.stdout


def test_start_status_stop(env: dict[str, str]) -> None:
    started = run(env, "start")
    try:
        assert started.returncode == 0, started.stderr
        assert "started (pid" in started.stdout
        record = json.loads(Path(env["FAKE_RECORD"]).read_text())
        assert record["argv"] == ["serve"]
        assert record["env"]["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"
        assert record["env"]["MPS_ENABLE_FP16"] == "1"
        assert record["env"]["PROXY_HOST"] == "127.0.0.1"  # localhost unless the user opts in
        assert record["env"]["PROXY_PORT"] == env["PROXY_PORT"]
        if sys.platform != "darwin":
            assert record["env"]["LLM_GUARD_DEVICE"] == "cpu"

        again = run(env, "start")
        assert again.returncode == 0 and "already running" in again.stdout

        status = run(env, "status")
        assert status.returncode == 0
        assert status.stdout.startswith("running (pid") and '"status": "ok"' in status.stdout
    finally:
        stopped = run(env, "stop")
    assert stopped.returncode == 0 and "stopped (pid" in stopped.stdout
    assert run(env, "status").returncode == 3
    assert not (Path(env["OLLAMA_GUARD_STATE_DIR"]) / "proxy.pid").exists()


def test_start_reports_a_proxy_that_dies(env: dict[str, str]) -> None:
    out = run({**env, "FAKE_CRASH": "1"}, "start")
    assert out.returncode == 2
    assert "exited during start-up" in out.stderr
    assert run(env, "status").returncode == 3


def test_user_device_choice_wins(env: dict[str, str]) -> None:
    out = run({**env, "LLM_GUARD_DEVICE": "cuda"}, "detect")
    assert "device: cuda" in out.stdout


def test_register_passes_its_arguments_to_the_node_cli(env: dict[str, str]) -> None:
    args = ["--guard-proxy", "guard", "--address", "192.168.1.50", "--namespace", "ollama-guard"]
    out = run({**env, "PROXY_HOST": "0.0.0.0"}, "register", *args)
    assert out.returncode == 0, out.stderr
    assert json.loads(Path(env["FAKE_RECORD"]).read_text())["argv"] == ["node", "register", *args]


def test_register_warns_when_the_proxy_listens_on_localhost_only(env: dict[str, str]) -> None:
    out = run(env, "register", "--help")
    assert "PROXY_HOST=0.0.0.0" in out.stderr


def test_mac_detection_uses_mps(fake_mac: dict[str, str]) -> None:
    out = run(fake_mac, "detect")
    assert out.returncode == 0, out.stderr
    assert "os: Darwin arm64" in out.stdout
    assert "apple_silicon: yes" in out.stdout and "mps: available" in out.stdout
    assert "device: mps" in out.stdout


def test_mac_without_mps_falls_back_to_cpu(fake_mac: dict[str, str], tmp_path: Path) -> None:
    no_mps = write_exe(tmp_path / "python-nomps", "#!/bin/sh\nexit 1\n")
    out = run({**fake_mac, "OLLAMA_GUARD_PYTHON": str(no_mps)}, "detect")
    assert "mps: unavailable" in out.stdout and "device: cpu" in out.stdout


def test_mac_install_writes_a_launchd_agent_and_uninstall_removes_it(fake_mac: dict[str, str]) -> None:
    out = run(fake_mac, "install")
    assert out.returncode == 0, out.stderr
    plist_path = Path(fake_mac["HOME"]) / "Library" / "LaunchAgents" / "io.ollama-guard.proxy.plist"
    plist = plistlib.loads(plist_path.read_bytes())
    assert plist["Label"] == "io.ollama-guard.proxy"
    assert plist["ProgramArguments"] == [fake_mac["OLLAMA_GUARD_BIN"], "serve"]
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["EnvironmentVariables"]["LLM_GUARD_DEVICE"] == "mps"
    assert plist["EnvironmentVariables"]["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"
    assert plist["EnvironmentVariables"]["MPS_ENABLE_FP16"] == "1"
    assert plist["StandardOutPath"].endswith("Library/Logs/ollama-guard/proxy.log") or plist[
        "StandardOutPath"
    ].endswith("proxy.log")
    calls = Path(fake_mac["LAUNCHCTL_LOG"]).read_text().splitlines()
    assert f"bootstrap gui/{os.getuid()} {plist_path}" in calls

    out = run(fake_mac, "uninstall")
    assert out.returncode == 0, out.stderr
    assert not plist_path.exists()
    assert f"bootout gui/{os.getuid()}/io.ollama-guard.proxy" in Path(fake_mac["LAUNCHCTL_LOG"]).read_text()


def test_plist_escapes_xml(fake_mac: dict[str, str]) -> None:
    out = run({**fake_mac, "OLLAMA_URL": "http://ollama.local:11434/?a=1&b=<2>"}, "plist")
    assert out.returncode == 0, out.stderr
    plist = plistlib.loads(out.stdout.encode())
    assert plist["EnvironmentVariables"]["OLLAMA_URL"] == "http://ollama.local:11434/?a=1&b=<2>"
