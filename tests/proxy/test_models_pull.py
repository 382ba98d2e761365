"""`ollama-guard models pull`: clear error when the hub cannot be reached; skips what is already there."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import yaml

from .tinymodels import injection_model


def config(tmp_path):
    repo = "protectai/deberta-v3-base-prompt-injection-v2"
    scanner = {"type": "PromptInjection", "model": {"path": "pi", "hf_repo": repo}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump({"models_path": str(tmp_path / "models"), "input_scanners": [scanner], "output_scanners": []})
    )
    return cfg


def run_pull(cfg_path, extra_env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens: refused at once, no real network
    env = {**os.environ, "HF_ENDPOINT": dead, "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2", **extra_env}
    return subprocess.run(
        [sys.executable, "-m", "ollama_guard.cli", "-c", str(cfg_path), "models", "pull"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_pull_offline_says_so_and_fails(tmp_path):
    cfg = config(tmp_path)
    out = run_pull(cfg, {})
    assert out.returncode == 1
    assert "cannot reach the Hugging Face hub" in out.stderr and "Are you offline?" in out.stderr
    assert "pulled 0 model(s), 1 failure(s)" in out.stdout


def test_pull_skips_models_already_present(tmp_path):
    injection_model(tmp_path / "models" / "pi", False)
    cfg = config(tmp_path)
    out = run_pull(cfg, {})
    assert out.returncode == 0 and "already present" in out.stdout
