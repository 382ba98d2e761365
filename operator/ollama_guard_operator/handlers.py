"""kopf handlers: thin wiring from events and timers to reconcile.py.

- GuardProxy: one reconcile for create/update/resume, and a timer that repairs drift (deleted children
  recreated, hand-edited fields re-applied: see apply.drifted).
- ScanNode: a timer probes /health and records the result in status; any ScanNode event re-syncs the
  GuardProxy's EndpointSlices, so a node joins or leaves the Service as its health flips or it is deleted.
- A liveness probe: /healthz fails while the API server cannot be reached or refuses our credentials.

No finalizer: children go with their GuardProxy through owner references (the API server's garbage
collector), so nothing needs the operator at deletion time, and `helm uninstall` or a namespace deletion
that removes the operator together with its GuardProxies leaves nothing stuck (a finalizer whose
controller is gone keeps the object and its namespace Terminating: shared/k8s-real/07). kopf puts a
finalizer on anything a timer watches, so the timers are registered without one (`_timer_without_finalizer`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import random
from collections.abc import Callable
from typing import Any

import aiohttp
import kopf
import kubernetes

from . import reconcile, status
from .builders import GROUP, VERSION
from .kube import ApiError, Kube, bearer_token, load_configuration
from .probe import probe
from .spec import InvalidSpec, parse_scannode

DRIFT_SECONDS = float(os.environ.get("OLLAMA_GUARD_OPERATOR_DRIFT_SECONDS", "60"))
PROBE_SECONDS = float(os.environ.get("OLLAMA_GUARD_OPERATOR_PROBE_SECONDS", "10"))
# A ScanNode's status is written when its health, counters or message change, and at least this often
# (lastProbeTime), not on every probe: a settled cluster sees no writes between heartbeats.
HEARTBEAT_SECONDS = float(os.environ.get("OLLAMA_GUARD_OPERATOR_HEARTBEAT_SECONDS", "300"))
PEERING_NAME = "ollama-guard-operator"

_configuration: kubernetes.client.Configuration | None = None


def use_configuration(cfg: kubernetes.client.Configuration | None) -> None:
    """Point the operator (kopf's own watches and our client) at this API server instead of the default."""
    global _configuration
    _configuration = cfg


def _config() -> kubernetes.client.Configuration:
    global _configuration
    if _configuration is None:
        _configuration = load_configuration()
    return _configuration


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf's credentials, from the same configuration as our client: client certificates, or the bearer
    token of a kubeconfig, an exec plugin or the in-cluster ServiceAccount (re-read on kopf's re-login
    after a 401, so a rotated token is picked up)."""
    cfg = _config()
    scheme, _sep, credential = (bearer_token(cfg) or "").partition(" ")
    tls = str(cfg.host).startswith("https")
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert if tls else None,
        insecure=not cfg.verify_ssl,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        scheme=scheme or None,
        token=credential or None,
    )


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Progress and diff-base in annotations: the CRD's status schema stays ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled")
    settings.persistence.finalizer = f"{GROUP}/operator"
    # Peering: every replica gets a random priority; only the highest runs, the others pause.
    settings.peering.name = PEERING_NAME
    settings.peering.clusterwide = True
    settings.peering.priority = random.randint(1, 2**31)  # noqa: S311 - not security-relevant
    settings.posting.level = 20  # INFO and up become Kubernetes Events
    settings.watching.server_timeout = 300
    memo.kube = Kube(_config())
    memo.http = aiohttp.ClientSession()


@kopf.on.probe(id="api", errors=kopf.ErrorsMode.PERMANENT)
async def api_reachable(memo: kopf.Memo, **_: Any) -> str:
    """Liveness: the API server answers within 5 s and lets us read our own resources. Any failure (a
    refused connection, a timeout, 401, 403) fails /healthz with a 500 at once: no retry inside a probe."""
    await asyncio.wait_for(
        memo.kube.request("GET", "/apis/ollama-guard.io/v1alpha1/guardproxies", params={"limit": "1"}), 5
    )
    return "ok"


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await memo.kube.close()
    await memo.http.close()


def _obj(raw: dict[str, Any]) -> Any:
    """kopf's event helpers take any object with metadata; its type hints only name Body."""
    return raw


def _lock(memo: kopf.Memo) -> asyncio.Lock:
    # The per-object memo is shared by this object's handlers and timers: never reconcile one twice at once.
    if "lock" not in memo:
        memo.lock = asyncio.Lock()
    return memo.lock


def _backoff(retry: int) -> float:
    return float(min(300, 5 * 2 ** min(retry, 6)))


async def _reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any, retry: int) -> None:
    raw = dict(body)
    async with _lock(memo):
        try:
            result = await reconcile.reconcile_guardproxy(memo.kube, raw)
        except InvalidSpec as exc:
            _set_status(patch, raw, reconcile.failed_status(raw, "InvalidSpec", str(exc)))
            kopf.warn(_obj(raw), reason="InvalidSpec", message=str(exc))
            raise kopf.PermanentError(f"invalid spec: {exc}") from None
        except reconcile.MissingDependency as exc:
            _set_status(patch, raw, reconcile.failed_status(raw, "MissingDependency", str(exc)))
            raise kopf.TemporaryError(str(exc), delay=_backoff(retry)) from None
        except ApiError as exc:
            _set_status(patch, raw, reconcile.failed_status(raw, "ApiError", str(exc)))
            if 400 <= exc.status < 500 and exc.status not in (404, 409, 429):
                raise kopf.PermanentError(f"the API server refused a child: {exc}") from None
            raise kopf.TemporaryError(str(exc), delay=_backoff(retry)) from None
    _set_status(patch, raw, result.status)
    out = result.outcome
    parts = [
        f"{verb} {', '.join(items)}"
        for verb, items in (("created", out.created), ("updated", out.updated), ("deleted", out.deleted))
        if items
    ]
    if parts:
        kopf.info(_obj(raw), reason="Reconciled", message="; ".join(parts)[:1000])
        logger.info("reconciled: %s", "; ".join(parts))
    _report_drift(raw, out.repaired, logger)


def _report_drift(raw: dict[str, Any], repaired: list[str], logger: Any) -> None:
    """One Event and one log line per child that a hand edit had made drift and that was re-applied."""
    for item in repaired:
        message = f"repaired drift in {item}"
        kopf.info(_obj(raw), reason="DriftRepaired", message=message[:1000])
        logger.info(message)


def _set_status(patch: kopf.Patch, body: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in status.status_patch(body.get("status"), new).items():
        patch.status[key] = value


@kopf.on.resume(GROUP, VERSION, "guardproxies")
@kopf.on.create(GROUP, VERSION, "guardproxies")
@kopf.on.update(GROUP, VERSION, "guardproxies")
async def reconcile_guardproxy(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any, retry: int, **_: Any
) -> None:
    await _reconcile(body, patch, memo, logger, retry)


def _timer_without_finalizer(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register the timer just decorated by kopf without the finalizer kopf gives every timer (it exists to
    stop the timer before the object goes; kopf stops it on the deletion event anyway, and a pass that
    races the deletion only writes children the garbage collector removes)."""
    spawning = kopf.get_default_registry()._spawning  # kopf has no public switch for this
    spawning._handlers = [
        dataclasses.replace(h, requires_finalizer=False) if getattr(h, "fn", None) is fn else h
        for h in spawning._handlers
    ]
    return fn


@_timer_without_finalizer
@kopf.timer(GROUP, VERSION, "guardproxies", interval=DRIFT_SECONDS, initial_delay=DRIFT_SECONDS)
async def repair_drift(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    ready = status.get_condition(body.get("status"), status.READY)
    generation = body.get("metadata", {}).get("generation")
    if ready and ready.get("reason") == "InvalidSpec" and ready.get("observedGeneration") == generation:
        return  # reported once; a new generation brings a new try
    try:
        await _reconcile(body, patch, memo, logger, retry=0)
    except kopf.PermanentError:
        return  # status says why; the timer must not loop on it


@_timer_without_finalizer
@kopf.timer(GROUP, VERSION, "scannodes", interval=PROBE_SECONDS)
async def probe_scannode(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    raw = dict(body)
    old = raw.get("status") or {}
    try:
        spec = parse_scannode(raw.get("spec") or {})
    except InvalidSpec as exc:
        patch.status.update({"healthy": False, "message": f"invalid spec: {exc}"})
        return
    result = await probe(memo.http, spec)
    healthy, failures, successes = reconcile.next_node_status(
        old, result.ok, (spec.probe.failure_threshold, spec.probe.success_threshold)
    )
    new = {
        "healthy": healthy,
        "device": result.device or old.get("device"),
        "version": result.version or old.get("version"),
        "consecutiveFailures": failures,
        "consecutiveSuccesses": successes,
        "message": result.message,
        "observedGeneration": raw.get("metadata", {}).get("generation"),
    }
    if all(old.get(k) == v for k, v in new.items() if v is not None) and not _heartbeat_due(old):
        return  # nothing changed: no write (latency alone is not worth one)
    new["lastProbeTime"] = status.now()
    new["latencyMs"] = result.latency_ms
    if old.get("healthy") is not None and old.get("healthy") != healthy:
        kopf.event(
            _obj(raw),
            type="Normal" if healthy else "Warning",
            reason="Healthy" if healthy else "Unhealthy",
            message=result.message,
        )
    patch.status.update({k: v for k, v in new.items() if v is not None})


def _heartbeat_due(old: dict[str, Any]) -> bool:
    last = old.get("lastProbeTime")
    if not last:
        return True
    try:
        then = datetime.datetime.fromisoformat(str(last).replace("Z", "+00:00"))
    except ValueError:
        return True
    return (datetime.datetime.now(datetime.UTC) - then).total_seconds() >= HEARTBEAT_SECONDS


@kopf.on.event(GROUP, VERSION, "scannodes")
async def scannode_changed(body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    gp = (body.get("spec") or {}).get("guardProxy")
    namespace = body.get("metadata", {}).get("namespace")
    if not gp or not namespace:
        return
    outcome = await reconcile.sync_scan_nodes(memo.kube, namespace, gp)
    if outcome is not None and outcome.changed:
        logger.info(
            "ScanNode endpoints of %s/%s: created %s, updated %s, deleted %s, repaired %s",
            namespace,
            gp,
            outcome.created,
            outcome.updated,
            outcome.deleted,
            outcome.repaired,
        )
