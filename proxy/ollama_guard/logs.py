"""Structured logs: one JSON object per line, each carrying the request id of the request it belongs to.

Prompts and answers never appear in logs unless `logging.log_content` is set; the audit record says who,
what model, which route, the decision and the scanners that fired with their scores and latencies.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import orjson

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid:
            out["request_id"] = rid
        for k, v in record.__dict__.items():
            if k not in _RESERVED and k != "request_id" and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = request_id.get()
        return True


def configure(level: str = "INFO", json_format: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # llm-guard logs every scan through structlog at debug/warning, with findings in them: keep it quiet.
    logging.getLogger("llm_guard").setLevel(logging.ERROR)
    for noisy in ("presidio-analyzer", "transformers", "urllib3", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_llm_guard()


def quiet_llm_guard() -> None:
    """llm-guard's structlog logger prints each detection (with secret types) to stdout; route it to logging."""
    try:
        import structlog
    except ImportError:
        return
    structlog.configure(
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        cache_logger_on_first_use=True,
    )


audit_log = logging.getLogger("ollama_guard.audit")


def short_audit_record(
    scope: MutableMapping[str, Any], route: str, decision: str, status: int, **extra: Any
) -> dict[str, Any]:
    """The audit record of a guarded request that ended before its body was read as a request (refused at
    the gate, malformed, a client gone): who, route, decision, status. Never any text of the request."""
    state = scope.get("state", {})
    principal = state.get("principal")
    who = principal.name if principal else state.get("client_ip")
    return {"who": who, "route": route, "decision": decision, "status": status, **extra}
