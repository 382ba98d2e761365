"""`ollama-guard`: serve the proxy, try a policy on a text, fetch models, check a config, register Mac minis."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from . import __version__
from .settings import ConfigError, Settings, load_settings


def _offline_defaults() -> None:
    # Model scanners load from the local models directory; never wait ~46 s per model on an unreachable hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Settings:
    try:
        return load_settings(args.config, overrides)
    except ConfigError as exc:
        print(f"ollama-guard: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    _offline_defaults()
    overrides: dict[str, Any] = {}
    if args.host:
        overrides["proxy_host"] = args.host
    if args.port:
        overrides["proxy_port"] = args.port
    if args.ollama_url:
        overrides["ollama_url"] = args.ollama_url
    if args.workers:
        overrides["workers"] = args.workers
    settings = _load(args, overrides)
    from . import logs

    logs.configure(settings.logging.level, settings.logging.json_format)
    import uvicorn

    common = dict(
        host=settings.proxy_host,
        port=settings.proxy_port,
        log_level="warning",
        # uvicorn's own lines ("Invalid HTTP request received.") go through our handler: JSON like the rest.
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
        timeout_keep_alive=30,
        lifespan="on",
    )
    if settings.workers == 1:
        from .app import create_app

        uvicorn.run(create_app(settings), loop="auto", http="auto", **common)  # type: ignore[arg-type]
        return 0
    # Several workers: each process builds its own app from the same environment; metrics are shared on disk.
    import tempfile

    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="ollama-guard-metrics-"))
    if args.config:
        os.environ["OLLAMA_GUARD_CONFIG"] = os.path.abspath(args.config)
    for k, v in overrides.items():
        os.environ[f"OLLAMA_GUARD_{k.upper()}"] = str(v)
    uvicorn.run("ollama_guard.app_factory:app", factory=True, workers=settings.workers, **common)  # type: ignore[arg-type]
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    _offline_defaults()
    settings = _load(args)
    from . import logs

    logs.configure("WARNING", json_format=False)
    text = args.text if args.text is not None else sys.stdin.read()
    from .scanning.engine import ScanEngine
    from .scanning.policy import build_policy

    policy = build_policy(settings)
    for s in policy.all():
        if s.missing:
            print(f"! {s.direction}/{s.name}: {'REQUIRED, ' if s.required else ''}not loaded: {s.missing}")
    engine = ScanEngine(policy, settings)
    if policy.missing_required():
        print("verdict: REFUSED (required scanners are missing)")
        return 3

    async def run() -> Any:
        try:
            if args.output:
                return await engine.scan_window(policy.active("output"), text, args.prompt or "")
            return await engine.scan_window(policy.active("input"), text, direction="input")
        finally:
            await policy.aclose()  # the guard models' sessions belong to this loop

    verdict = asyncio.run(run())
    engine.close()
    for r in verdict.results:
        state = "ERROR " + (r.error or "") if r.error else ("pass" if r.valid else "FIRED")
        print(f"{r.scanner:<20} {r.action:<9} {state:<6} score={r.score:+.2f} {r.ms:7.1f} ms")
    label = "BLOCKED" if verdict.blocked else ("SANITIZED" if verdict.sanitized else "ALLOWED")
    print(f"verdict: {label}")
    if verdict.sanitized:
        print("sanitized text:")
        print(verdict.text)
    return 1 if verdict.blocked else 0


def cmd_config_check(args: argparse.Namespace) -> int:
    _offline_defaults()
    settings = _load(args)
    from .scanning.policy import build_policy
    from .security import Authenticator

    try:
        Authenticator(settings.auth)
    except ConfigError as exc:
        print(f"config: {exc}")
        return 2
    print(f"config OK: proxy {settings.proxy_host}:{settings.proxy_port} -> {settings.ollama_url}")
    if args.no_load:
        return 0
    from . import logs

    logs.configure("ERROR", json_format=False)
    policy = build_policy(settings)
    bad = 0
    for s in policy.all():
        if s.loaded:
            print(f"  ok       {s.direction}/{s.name} ({s.cfg.type}, {s.action})")
        else:
            bad += s.required
            print(f"  {'MISSING' if s.required else 'optional'} {s.direction}/{s.name}: {s.missing}")
    if bad:
        print("not ready: required scanners are missing")
        return 1
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    settings = _load(args)
    from .models import pull_models

    return pull_models(settings, force=args.force, only=args.scanner, onnx=args.onnx)


def cmd_node(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        from ollama_guard_operator.nodecli import main as node_main
    except ImportError:
        print(
            "ollama-guard node needs the operator extra: pip install 'ollama-guard[operator]'",
            file=sys.stderr,
        )
        return 2
    return int(node_main(rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ollama-guard", description="A guard proxy in front of Ollama.")
    ap.add_argument("--version", action="version", version=f"ollama-guard {__version__}")
    ap.add_argument("-c", "--config", help="YAML config file (default: $OLLAMA_GUARD_CONFIG, else built-in)")
    # -c/--config is taken after the subcommand too (`ollama-guard serve -c FILE`), as people type it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, help="YAML config file")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the proxy", parents=[common])
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--ollama-url")
    s.add_argument("--workers", type=int)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser(
        "scan", help="run the configured policy on a text and print each scanner's verdict", parents=[common]
    )
    s.add_argument("text", nargs="?", help="the text (default: stdin)")
    s.add_argument("--output", action="store_true", help="scan as an answer (output scanners)")
    s.add_argument("--prompt", help="with --output: the prompt the answer replies to")
    s.set_defaults(func=cmd_scan)

    m = sub.add_parser("models", help="scanner models").add_subparsers(dest="models_command", required=True)
    s = m.add_parser("pull", help="download the configured scanners' models into models_path", parents=[common])
    s.add_argument("--force", action="store_true")
    s.add_argument("--scanner", action="append", help="only this scanner (repeatable)")
    s.add_argument("--onnx", action="store_true", help="also export an ONNX copy of each model")
    s.set_defaults(func=cmd_models_pull)

    c = sub.add_parser("config", help="configuration").add_subparsers(dest="config_command", required=True)
    s = c.add_parser("check", help="validate the config and report each scanner's state", parents=[common])
    s.add_argument("--no-load", action="store_true", help="validate only; do not load scanners")
    s.set_defaults(func=cmd_config_check)

    sub.add_parser("node", help="register Mac minis as ScanNodes (register|list|remove; see --help)", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `node ...` is delegated whole to the operator package's CLI.
    if "node" in argv:
        i = argv.index("node")
        head = parser.parse_args(argv[:i] + ["node"]) if i else argparse.Namespace()
        return cmd_node(head, argv[i + 1 :])
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
