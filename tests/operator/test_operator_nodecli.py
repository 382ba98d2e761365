"""`ollama-guard node register|list|remove` against the API emulation, with the real kubernetes client."""

from __future__ import annotations

import asyncio

import kubernetes
import pytest
from kubemock import ApiServer, declare
from ollama_guard_operator import nodecli

pytestmark = pytest.mark.kmock(cls=ApiServer)


def api_for(kmock: ApiServer) -> kubernetes.client.CustomObjectsApi:
    cfg = kubernetes.client.Configuration()
    cfg.host = str(kmock.url).rstrip("/")
    return kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(cfg))


async def run(kmock: ApiServer, *argv: str) -> int:
    # The client is synchronous; the mock serves on this loop, so the client runs in a thread.
    return await asyncio.to_thread(nodecli.main, ["-n", "ai", *argv], api_for(kmock))


def node(kmock: ApiServer, name: str) -> dict | None:
    for (res, ns, n), obj in kmock.objects.items():
        if res.plural == "scannodes" and ns == "ai" and n == name and not obj.deleted:
            return obj.raw
    return None


async def test_register_creates_then_updates_list_and_remove(kmock: ApiServer, capsys: pytest.CaptureFixture) -> None:
    declare(kmock)
    assert (
        await run(
            kmock,
            "register",
            "--guardproxy",
            "guard",
            "--address",
            "192.168.1.20:8080",
            "--name",
            "mini-1",
            "--label",
            "rack=desk",
        )
        == 0
    )
    obj = node(kmock, "mini-1")
    assert obj["spec"] == {"guardProxy": "guard", "address": "192.168.1.20", "port": 8080, "scheme": "http"}
    assert obj["metadata"]["labels"] == {"rack": "desk", "ollama-guard.io/guardproxy": "guard"}

    assert await run(kmock, "register", "--guardproxy", "guard", "--address", "mini1.lan:9000", "--name", "mini-1") == 0
    assert node(kmock, "mini-1")["spec"]["address"] == "mini1.lan"
    assert node(kmock, "mini-1")["spec"]["port"] == 9000

    capsys.readouterr()
    assert await run(kmock, "list") == 0
    out = capsys.readouterr().out
    assert "mini-1" in out and "mini1.lan:9000" in out and "unknown" in out

    assert await run(kmock, "remove", "mini-1") == 0
    assert node(kmock, "mini-1") is None
    assert await run(kmock, "remove", "mini-1") == 1


def test_address_must_be_host_and_port() -> None:
    with pytest.raises(SystemExit):
        nodecli.build_parser().parse_args(["register", "--guardproxy", "g", "--address", "nohost"])


async def test_the_documented_namespace_option_after_the_subcommand_works(kmock: ApiServer) -> None:
    """docs/OPERATOR.md writes `ollama-guard node register ... --namespace ai`: taken where it is typed."""
    declare(kmock)
    argv = [
        "register",
        "--guardproxy",
        "guard",
        "--address",
        "192.168.1.20:8080",
        "--name",
        "mini-1",
        "--namespace",
        "ai",
    ]
    assert await asyncio.to_thread(nodecli.main, argv, api_for(kmock)) == 0
    assert node(kmock, "mini-1") is not None
    assert await asyncio.to_thread(nodecli.main, ["remove", "mini-1", "--namespace", "ai"], api_for(kmock)) == 0
    assert node(kmock, "mini-1") is None
