"""Shared test setup: no network, ever (model code must load local files)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("OLLAMA_GUARD_CONFIG", None)

import pytest  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    """In CI (CI=true) every tier must run: a test that skips for a missing tool (redis-server, prometheus,
    helm ...) fails loudly instead. Only the cluster tier may skip there: CI has no Kubernetes cluster."""
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and os.environ.get("CI") == "true"
        and item.get_closest_marker("cluster") is None
        and not getattr(report, "wasxfail", False)
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "darwin" not in reason and "macOS" not in reason:  # platform checks skip by design
            report.outcome = "failed"
            report.longrepr = f"skipped in CI, where every tier must run: {reason}"
