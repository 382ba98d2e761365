"""Operator tests: make the operator package importable from a bare checkout too."""

import pathlib
import sys

try:
    import ollama_guard_operator  # noqa: F401
except ImportError:  # not installed (editable) into this venv yet
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "operator"))

import os  # noqa: E402

# The operator's timers, short for tests; read when ollama_guard_operator.handlers is first imported, so set
# here, before any test module imports it.
os.environ.setdefault("OLLAMA_GUARD_OPERATOR_PROBE_SECONDS", "0.2")
os.environ.setdefault("OLLAMA_GUARD_OPERATOR_DRIFT_SECONDS", "0.5")
