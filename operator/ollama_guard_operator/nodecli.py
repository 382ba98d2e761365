"""`ollama-guard node register|list|remove`: manage ScanNodes (Mac minis running the proxy natively).

The proxy CLI delegates `ollama-guard node ...` here. Uses the kubeconfig (or in-cluster credentials).
"""

from __future__ import annotations

import argparse
import socket
import sys
from typing import Any

import kubernetes

from .spec import address_problem

GROUP, VERSION, PLURAL = "ollama-guard.io", "v1alpha1", "scannodes"
LABEL_GUARDPROXY = f"{GROUP}/guardproxy"


def _api() -> kubernetes.client.CustomObjectsApi:
    from .kube import load_configuration

    return kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(load_configuration()))


def _default_namespace() -> str:
    try:
        _, active = kubernetes.config.list_kube_config_contexts()
        return active.get("context", {}).get("namespace") or "default"
    except (kubernetes.config.ConfigException, OSError, TypeError):
        return "default"


def _parse_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _parse_endpoint(value: str) -> tuple[str, int]:
    host, port = _parse_address(value)
    problem = address_problem(host)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}: the cluster cannot route to it; give an address it reaches")
    return host, port


def _parse_label(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected k=v, got {value!r}")
    return key, val


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ollama-guard node", description=__doc__)
    parser.add_argument("-n", "--namespace", default=None, help="default: the kubeconfig context's namespace")
    # -n/--namespace is taken before or after the subcommand, as people type it either way.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", help="create or update a ScanNode", parents=[common])
    reg.add_argument("--guardproxy", required=True, help="the GuardProxy whose Service this node joins")
    reg.add_argument("--address", required=True, type=_parse_endpoint, help="HOST:PORT the cluster reaches it at")
    reg.add_argument("--name", default=None, help="default: this host's short name")
    reg.add_argument("--label", action="append", default=[], type=_parse_label, help="k=v (repeatable)")
    reg.add_argument("--scheme", choices=["http", "https"], default="http")
    sub.add_parser("list", help="list ScanNodes and their health", parents=[common])
    rm = sub.add_parser("remove", help="delete a ScanNode", parents=[common])
    rm.add_argument("name")
    return parser


def _node_name(value: str | None) -> str:
    name = (value or socket.gethostname().split(".")[0]).lower()
    return "".join(c if c.isalnum() or c == "-" else "-" for c in name).strip("-") or "scan-node"


def register(api: kubernetes.client.CustomObjectsApi, ns: str, args: argparse.Namespace) -> int:
    host, port = args.address
    name = _node_name(args.name)
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ScanNode",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {**dict(args.label), LABEL_GUARDPROXY: args.guardproxy},
        },
        "spec": {"guardProxy": args.guardproxy, "address": host, "port": port, "scheme": args.scheme},
    }
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
        print(f"scannode/{name} created")
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:
            raise
        api.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            ns,
            PLURAL,
            name,
            {"metadata": {"labels": body["metadata"]["labels"]}, "spec": body["spec"]},
            _content_type="application/merge-patch+json",
        )
        print(f"scannode/{name} updated")
    return 0


def list_nodes(api: kubernetes.client.CustomObjectsApi, ns: str) -> int:
    listing: dict[str, Any] = api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)  # type: ignore[assignment]
    items = listing.get("items", [])
    rows = [("NAME", "GUARDPROXY", "ADDRESS", "HEALTHY", "DEVICE", "LATENCY")]
    for it in items:
        spec, st = it.get("spec", {}), it.get("status") or {}
        healthy = st.get("healthy")
        rows.append(
            (
                it["metadata"]["name"],
                spec.get("guardProxy", ""),
                f"{spec.get('address')}:{spec.get('port', 8080)}",
                "unknown" if healthy is None else str(healthy).lower(),
                st.get("device") or "-",
                f"{st['latencyMs']}ms" if "latencyMs" in st else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def remove(api: kubernetes.client.CustomObjectsApi, ns: str, name: str) -> int:
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            print(f"scannode/{name} not found", file=sys.stderr)
            return 1
        raise
    print(f"scannode/{name} deleted")
    return 0


def main(argv: list[str], api: kubernetes.client.CustomObjectsApi | None = None) -> int:
    """Entry point for `ollama-guard node ...`; returns the exit status."""
    args = build_parser().parse_args(argv)
    api = api or _api()
    ns = args.namespace or _default_namespace()
    try:
        if args.command == "register":
            return register(api, ns, args)
        if args.command == "list":
            return list_nodes(api, ns)
        return remove(api, ns, args.name)
    except kubernetes.client.ApiException as exc:
        print(f"error: the API server answered {exc.status}: {exc.reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
