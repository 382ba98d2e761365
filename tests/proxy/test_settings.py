"""Configuration: the original proxy's keys and variables work; unknown keys stop the process by name."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ollama_guard.settings import ConfigError, load_settings


def write(tmp_path, text):
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


def test_original_flat_keys_are_understood(tmp_path):
    s = load_settings(
        write(
            tmp_path,
            """
proxy_host: 0.0.0.0
proxy_port: 8080
ollama_url: http://ollama:11434
enable_input_guard: true
enable_output_guard: false
block_on_guard_error: false
cache_enabled: true
cache_size: 2000
cache_ttl: 60
use_local_models: true
models_path: ./models
rate_limit_enabled: true
rate_limit_per_minute: 30
rate_limit_per_hour: 500
rate_limit_burst: 5
enable_ip_filter: true
ip_whitelist: ["10.0.0.0/8", "192.168.0.0/16"]
""",
        ),
        environ={},
    )
    assert s.enable_output_guard is False and s.block_on_guard_error is False
    assert (s.cache.max_size, s.cache.ttl) == (2000, 60)
    assert (s.rate_limit.enabled, s.rate_limit.per_minute, s.rate_limit.per_hour, s.rate_limit.burst) == (
        True,
        30,
        500,
        5,
    )
    assert s.ip_filter.enabled and s.ip_filter.allow == ["10.0.0.0/8", "192.168.0.0/16"]


def test_original_environment_variables_override_the_file(tmp_path):
    path = write(tmp_path, "ollama_url: http://a:1\n")
    s = load_settings(
        path,
        environ={
            "OLLAMA_URL": "http://b:2",
            "LLM_GUARD_DEVICE": "mps",
            "MPS_ENABLE_FP16": "true",
            "CACHE_MAX_SIZE": "5",
            "CACHE_TTL": "9",
            "REDIS_URL": "redis://r:6379/1",
            "OLLAMA_GUARD_LIMITS__MAX_MESSAGES": "7",
        },
    )
    assert s.ollama_url == "http://b:2" and s.device == "mps" and s.mps_enable_fp16 is True
    assert (s.cache.max_size, s.cache.ttl, s.redis.url) == (5, 9, "redis://r:6379/1")
    assert s.limits.max_messages == 7


@pytest.mark.parametrize(
    "text,needle",
    [
        ("proxy_prot: 8080\n", "proxy_prot: unknown key"),
        ("cache:\n  backnd: redis\n", "cache.backnd: unknown key"),
        ("input_scanners:\n  - type: Secrets\n    acton: block\n", "input_scanners.0.acton: unknown key"),
        ("proxy_port: eighty\n", "proxy_port"),
        ("ollama_url: ftp://x\n", "ollama_url"),
        ("ip_whitelist: ['10.0.0.300/8']\n", "ip_filter.allow"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text), environ={})
    assert needle in str(err.value)


def test_unknown_prefixed_environment_variable_is_refused():
    with pytest.raises(ConfigError, match="OLLAMA_GUARD_NOPE"):
        load_settings(environ={"OLLAMA_GUARD_NOPE": "1"})


def test_unknown_scanner_type_is_reported_at_startup(tmp_path):
    from ollama_guard.scanning.policy import build_policy

    s = load_settings(write(tmp_path, "input_scanners:\n  - type: Secretz\n"), environ={})
    with pytest.raises(ConfigError, match="input_scanners.0.type: unknown input scanner type 'Secretz'"):
        build_policy(s)


def test_serve_stops_with_a_message_naming_the_key(tmp_path):
    path = write(tmp_path, "enable_input_gaurd: true\n")
    out = subprocess.run(
        [sys.executable, "-m", "ollama_guard.cli", "-c", str(path), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "enable_input_gaurd: unknown key" in out.stderr


def test_defaults_are_secure():
    s = load_settings(environ={})
    assert s.block_on_guard_error is True and s.logging.log_content is False
    assert s.management.allow_model_management is False and s.cors.allow_origins == []
    assert s.proxy_host == "127.0.0.1" and s.cache.backend == "memory"


def test_config_reference_is_up_to_date():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, str(root / "scripts" / "config_reference.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("order", ["before", "after"])
def test_the_config_option_is_taken_before_or_after_the_subcommand(tmp_path, capsys, order):
    from ollama_guard.cli import main

    path = tmp_path / "config.yaml"
    path.write_text("no_such_key: 1\n")
    args = ["-c", str(path), "config", "check", "--no-load"]
    if order == "after":
        args = ["config", "check", "--no-load", "-c", str(path)]
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code != 0
    assert "no_such_key" in capsys.readouterr().err
