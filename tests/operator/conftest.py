"""Operator tests: make the operator package importable from a bare checkout too."""

import pathlib
import sys

try:
    import ollama_guard_operator  # noqa: F401
except ImportError:  # not installed (editable) into this venv yet
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "operator"))
