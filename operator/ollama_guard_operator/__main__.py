"""`ollama-guard-operator`: run the kopf operator with the handlers of this package, cluster-wide."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from typing import Any

import kopf
import kubernetes

from . import handlers
from .kube import load_configuration

log = logging.getLogger("ollama_guard_operator")


def ensure_peering(cfg: kubernetes.client.Configuration) -> bool:
    """Create the ClusterKopfPeering object that replicas coordinate through; False when that cannot be
    done (its CRD is absent, or we may not create it): the operator then runs standalone."""
    api = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(cfg))
    body = {
        "apiVersion": "kopf.dev/v1",
        "kind": "ClusterKopfPeering",
        "metadata": {"name": handlers.PEERING_NAME},
    }
    try:
        api.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", body)
    except kubernetes.client.ApiException as exc:
        if exc.status == 409:
            return True
        log.warning("cannot create ClusterKopfPeering %s (%s): running standalone", handlers.PEERING_NAME, exc.status)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ollama-guard-operator", description=__doc__)
    parser.add_argument(
        "--namespace",
        action="append",
        default=None,
        help="watch only these namespaces (repeatable); default: all",
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        default=os.environ.get("OLLAMA_GUARD_OPERATOR_STANDALONE") == "1",
        help="no peering: for a single replica",
    )
    parser.add_argument(
        "--liveness", default=os.environ.get("OLLAMA_GUARD_OPERATOR_LIVENESS", "http://0.0.0.0:8081/healthz")
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)

    _ensure_user()
    cfg = load_configuration()
    handlers.use_configuration(cfg)
    standalone = args.standalone or not ensure_peering(cfg)
    if standalone:
        log.info("running standalone: no peering with other replicas")
    kopf.run(**run_options(args.namespace, standalone, args.liveness))
    return 0


def run_options(namespaces: list[str] | None, standalone: bool, liveness: str) -> dict[str, Any]:
    """kopf.run's arguments. A peering name given to kopf makes peering mandatory (kopf pauses until its
    peering object exists), so it is passed only when peering is wanted; handlers.startup names it too."""
    options: dict[str, Any] = {
        "clusterwide": not namespaces,
        "namespaces": namespaces or (),
        "standalone": standalone,
        "liveness_endpoint": liveness,
    }
    if not standalone:
        options["peering_name"] = handlers.PEERING_NAME
    return options


def _ensure_user() -> None:
    """kopf names its peering identity after getpass.getuser() unless POD_ID is set, and getpass fails for
    a uid without a passwd entry (OpenShift's arbitrary uids): give it a name to use."""
    try:
        getpass.getuser()
    except (KeyError, OSError):
        os.environ["USER"] = f"uid-{os.getuid()}"


if __name__ == "__main__":
    sys.exit(main())
