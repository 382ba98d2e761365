"""The bench scripts that drive the proxy's own parts run against those parts as they are now (a smoke test: they
print numbers, which are not asserted). bench/relay_cost.py stood broken for a stop after the relay began to
read Ollama's body with `readany`, which its stand-in response lacked: nothing ran it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_the_relay_bench_runs_the_relay_over_its_stand_in_response() -> None:
    out = run("relay_cost.py", "--chars", "400", "--repeat", "1")
    assert out.returncode == 0, out.stderr
    for row in ("/api/chat             together", "/v1/chat/completions  one per read", "parse only"):
        assert row in out.stdout


def test_the_garbage_collection_bench_reports_both_servers() -> None:
    out = run("gc_collections.py", "--requests", "20")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for name in ("pass-through", "proxy"):
        row = next((line for line in lines if line.startswith(name)), None)
        assert row is not None and len(row.split()) == 6, out.stdout
