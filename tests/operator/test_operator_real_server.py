"""The operator against an API mock that behaves like a real one (kubemock.py, facts from shared/k8s-real/).

Each test is one defect found on a real cluster: credentials as the kubernetes client stores them, the
way the chart starts the operator (a process, standalone or peering), a settled GuardProxy that writes
nothing, the Service's own EndpointSlices left alone, removed settings removed, a bad ScanNode kept to
itself, deletion that needs no operator, and a liveness probe that knows when the API refuses us.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kubernetes
import pytest
from kubemock import ApiServer, declare
from ollama_guard_operator import inprocess
from ollama_guard_operator.kube import FIELD_MANAGER
from test_operator_handlers import (
    ADMIN,
    ADMIN_TOKEN,
    DEADLINE,
    GP,
    NS,
    SN,
    SPEC,
    assert_settled,
    children,
    controller_slice_deletes,
    create,
    eventually,
    gp_status,
    handled,
    health_server,  # noqa: F401 - a fixture
    objects,
    patch,
    running_operator,
    scan_slices,
    slice_addresses,
)

pytestmark = pytest.mark.kmock(cls=ApiServer)

TOKEN = "operator-token"  # noqa: S105 - a test credential
USER = "system:serviceaccount:ollama-guard:ollama-guard-operator"
PROCESS_DEADLINE = 90.0  # a whole interpreter importing kopf and kubernetes, on a loaded CI machine


def kubeconfig(tmp_path: pathlib.Path, server: str, token: str = TOKEN) -> pathlib.Path:
    """A kubeconfig whose user has `token:`, as `kubectl create token` users and exec plugins give."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "mock", "cluster": {"server": server}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "mock", "context": {"cluster": "mock", "user": "sa", "namespace": NS}}],
        "current-context": "mock",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    return path


def env_of(dep: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0].get("env") or []}


def deployment(kmock: ApiServer, name: str = "guard-cpu") -> dict[str, Any]:
    return objects(kmock, "apps/v1/deployments")[name]


# -- credentials ------------------------------------------------------------------------------------------


async def test_a_kubeconfig_token_authenticates_the_operator(kmock: ApiServer, tmp_path: pathlib.Path) -> None:
    declare(kmock)
    kmock.tokens = {TOKEN: USER, ADMIN_TOKEN: "kubernetes-admin"}
    cfg = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(
        config_file=str(kubeconfig(tmp_path, str(kmock.url).rstrip("/"))), client_configuration=cfg
    )
    assert "authorization" not in cfg.api_key  # the client keeps it under "BearerToken"
    async with inprocess.running_operator(cfg, ready_within=DEADLINE, graceful=False):
        await create(kmock, GP, "guard", SPEC)
        await eventually(lambda: children(kmock)["deployments"] == {"guard-cpu"}, "children built")
    assert set(kmock.users) == {USER, "kubernetes-admin"}, set(kmock.users)  # never system:anonymous


async def test_the_in_cluster_service_account_token_authenticates_the_operator(
    kmock: ApiServer, tmp_path: pathlib.Path
) -> None:
    declare(kmock)
    kmock.tokens = {TOKEN: USER, ADMIN_TOKEN: "kubernetes-admin"}
    token_file, ca_file = tmp_path / "token", tmp_path / "ca.crt"
    token_file.write_text(TOKEN + "\n")  # a mounted token file may end in a newline
    ca_file.write_text("unused: the mock speaks plain HTTP")
    cfg = kubernetes.client.Configuration()
    loader = kubernetes.config.incluster_config.InClusterConfigLoader(
        str(token_file),
        str(ca_file),
        # No refresh hook: it would set the https URL back on the configuration on every refresh.
        try_refresh_token=False,
        environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(kmock.url.port)},
    )
    loader.load_and_set(cfg)
    assert cfg.api_key["BearerToken"].lower().startswith("bearer ")
    cfg.host = str(kmock.url).rstrip("/")  # the loader says https; the mock serves http on the same port
    async with inprocess.running_operator(cfg, ready_within=DEADLINE, graceful=False):
        await create(kmock, GP, "guard", SPEC)
        await eventually(lambda: children(kmock)["deployments"] == {"guard-cpu"}, "children built")
    assert set(kmock.users) == {USER, "kubernetes-admin"}, set(kmock.users)


# -- started as the chart starts it -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def operator_process(
    kmock: ApiServer, tmp_path: pathlib.Path, *args: str, token: str = TOKEN, **env: str
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """`python -m ollama_guard_operator ARGS` with a token kubeconfig; yields its /healthz URL and process."""
    port = _free_port()
    healthz = f"http://127.0.0.1:{port}/healthz"
    environ = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig(tmp_path, str(kmock.url).rstrip("/"), token)),
        "OLLAMA_GUARD_OPERATOR_DRIFT_SECONDS": "0.5",
        "OLLAMA_GUARD_OPERATOR_PROBE_SECONDS": "0.2",
        **env,
    }
    environ.pop("KUBERNETES_SERVICE_HOST", None)
    log = (tmp_path / "operator.log").open("wb")  # its output, for a failing test's message
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ollama_guard_operator",
        f"--liveness={healthz}",
        *args,
        env=environ,
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        yield healthz, proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        log.close()


async def _healthz(url: str) -> int | None:
    try:
        async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def eventually_async(check: Any, what: str, within: float) -> Any:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    ("args", "env", "peering_crd"),
    [
        (("--standalone",), {}, True),
        ((), {"OLLAMA_GUARD_OPERATOR_STANDALONE": "1"}, True),
        ((), {}, False),  # no peering CRD: standalone, not paused
        ((), {}, True),  # peering
    ],
    ids=["--standalone", "env-standalone", "no-peering-crd", "peering"],
)
async def test_the_operator_process_acts_standalone_and_with_peering(
    kmock: ApiServer, tmp_path: pathlib.Path, args: tuple[str, ...], env: dict[str, str], peering_crd: bool
) -> None:
    declare(kmock)
    if peering_crd:
        kmock.resources["kopf.dev/v1/clusterkopfpeerings"] = kmock.resources["v1/namespaces"].__class__(
            kind="ClusterKopfPeering",
            namespaced=False,
            subresources=set(),
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
        )
    kmock.tokens = {TOKEN: USER, ADMIN_TOKEN: "kubernetes-admin"}
    await create(kmock, GP, "guard", SPEC)
    async with operator_process(kmock, tmp_path, *args, **env) as (_, _proc):
        await eventually(
            lambda: children(kmock)["deployments"] == {"guard-cpu"}, "the process reconciles", PROCESS_DEADLINE
        )
        await eventually(lambda: gp_status(kmock).get("observedGeneration") == 1, "status", PROCESS_DEADLINE)


async def test_healthz_fails_while_the_api_server_refuses_the_operator(
    kmock: ApiServer, tmp_path: pathlib.Path
) -> None:
    declare(kmock)
    kmock.tokens = {TOKEN: USER, ADMIN_TOKEN: "kubernetes-admin"}
    async with operator_process(kmock, tmp_path, "--standalone") as (healthz, proc):
        await eventually_async(lambda: _healthz(healthz), "healthz answers", PROCESS_DEADLINE)
        assert await _healthz(healthz) == 200
        kmock.tokens = {
            "rotated": USER,
            ADMIN_TOKEN: "kubernetes-admin",
        }  # our token is no longer accepted: every call is 401

        async def failing() -> bool:
            # What the kubelet counts as a failed liveness probe: an answer other than 2xx/3xx, a refused
            # connection or no answer in time. kopf also exits once a re-login is refused; which comes
            # first depends on timing, and an exit restarts the container too, but not a clean exit 0.
            # What must not happen is a live process still answering 200.
            if proc.returncode is not None:
                assert proc.returncode != 0, "the operator ended with 0 while its credentials are refused"
                return True
            return await _healthz(healthz) != 200

        # kopf caches probe results for 10 s: the deadline covers that.
        try:
            await eventually_async(failing, "healthz fails while the API refuses us", 40)
        except AssertionError as e:
            tail = (tmp_path / "operator.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"{e}; the operator's output ends:\n{tail}") from None


# -- settled: zero writes, zero Events ------------------------------------------------------------------------


async def test_a_settled_guardproxy_with_scannodes_writes_nothing(
    kmock: ApiServer,
    health_server: dict[str, Any],  # noqa: F811 - the fixture
) -> None:
    declare(kmock)
    async with running_operator(kmock):
        await create(kmock, GP, "guard", SPEC)
        await create(
            kmock,
            SN,
            "mini-1",
            {"spec": {"guardProxy": "guard", "address": "localhost", "port": health_server["port"]}},
        )
        await eventually(lambda: slice_addresses(kmock) == ["localhost"], "the node in the slice")
        await eventually(lambda: handled(kmock), "kopf's handling cycle done")
        await eventually(lambda: gp_status(kmock).get("externalNodes", {}).get("summary") == "1/1", "1/1")
        await assert_settled(kmock)  # no child, slice, status or Event write over two drift passes
        assert controller_slice_deletes(kmock) == []
        events = [p for m, p in kmock.writes if p.endswith("/events")]
        assert not any("Drift" in json.dumps(b) for b in kmock.bodies if isinstance(b, dict)), events


async def test_the_services_own_endpointslices_are_never_touched(kmock: ApiServer) -> None:
    declare(kmock)
    async with running_operator(kmock):
        await create(kmock, GP, "guard", SPEC)
        await eventually(lambda: handled(kmock), "kopf's handling cycle done")
        controller = {
            n
            for n, s in objects(kmock, "discovery.k8s.io/v1/endpointslices").items()
            if s["metadata"]["labels"].get("endpointslice.kubernetes.io/managed-by") != "ollama-guard-operator"
        }
        assert len(controller) == 2  # guard and guard-redis, made by the (mock) controller
        await assert_settled(kmock)
        assert controller_slice_deletes(kmock) == []
        assert scan_slices(kmock) == []


# -- removed settings are removed -----------------------------------------------------------------------------


async def test_turning_redis_off_removes_its_env_from_the_proxy(kmock: ApiServer) -> None:
    declare(kmock)
    async with running_operator(kmock):
        await create(kmock, GP, "guard", SPEC)
        await eventually(lambda: "REDIS_URL" in env_of(deployment(kmock)), "managed Redis wired in")
        await patch(kmock, GP, "guard", {"spec": {"redis": {"mode": "disabled"}}})
        await eventually(lambda: not children(kmock)["statefulsets"], "the Redis StatefulSet deleted")
        await eventually(
            lambda: not {"REDIS_URL", "REDIS_PASSWORD"} & set(env_of(deployment(kmock))),
            "REDIS_URL and REDIS_PASSWORD gone from the Deployment",
        )


async def test_removing_the_api_keys_secret_removes_its_env_and_volume(kmock: ApiServer) -> None:
    declare(kmock)
    async with running_operator(kmock):
        await create(kmock, "v1/secrets", "keys", {"stringData": {"api-keys.yaml": "[]"}})
        await create(kmock, GP, "guard", {"spec": {**SPEC["spec"], "auth": {"apiKeysSecret": {"name": "keys"}}}})

        def mentions_keys() -> bool:
            return "keys" in json.dumps(deployment(kmock)["spec"]["template"])

        await eventually(mentions_keys, "the keys Secret mounted")
        await patch(kmock, GP, "guard", {"spec": {"auth": {"apiKeysSecret": None}}})
        await eventually(lambda: not mentions_keys(), "no env var or volume refers to the keys Secret")


async def test_a_child_an_older_operator_created_by_post_is_adopted_and_pruned(kmock: ApiServer) -> None:
    """Children made by POST (the operator before server-side apply creation) carry an Update entry that
    apply never prunes; the operator drops it once, and a removed field then goes."""
    declare(kmock)
    async with running_operator(kmock):
        await create(kmock, GP, "guard", SPEC)
        await eventually(lambda: handled(kmock), "first reconcile")
        # Re-create the Deployment as the old operator did: POST by our manager, with an extra env var.
        dep = deployment(kmock)
        old = {k: v for k, v in dep.items() if k != "status"}
        old["metadata"] = {
            k: v
            for k, v in dep["metadata"].items()
            if k in ("name", "namespace", "labels", "annotations", "ownerReferences")
        }
        old["metadata"]["annotations"] = {**old["metadata"]["annotations"], "ollama-guard.io/applied-hash": "old"}
        old["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "LEFT_BEHIND", "value": "1"})
        path = f"/apis/apps/v1/namespaces/{NS}/deployments"
        async with kmock.delete(f"{path}/guard-cpu", headers=ADMIN) as resp:
            assert resp.status == 200
        async with kmock.post(path, json=old, params={"fieldManager": FIELD_MANAGER}, headers=ADMIN) as resp:
            assert resp.status == 201, await resp.text()

        await eventually(lambda: "LEFT_BEHIND" not in env_of(deployment(kmock)), "the stale env var pruned")
        entries = {(e["manager"], e["operation"]) for e in deployment(kmock)["metadata"]["managedFields"]}
        assert (FIELD_MANAGER, "Update") not in entries and (FIELD_MANAGER, "Apply") in entries


# -- one bad ScanNode ---------------------------------------------------------------------------------------


async def test_a_scannode_at_a_loopback_address_is_refused_and_affects_no_other(
    kmock: ApiServer,
    health_server: dict[str, Any],  # noqa: F811 - the fixture
) -> None:
    declare(kmock)
    async with running_operator(kmock):
        await create(kmock, GP, "guard", SPEC)
        await create(kmock, SN, "bad", {"spec": {"guardProxy": "guard", "address": "127.0.0.1", "port": 8080}})
        await create(kmock, SN, "link", {"spec": {"guardProxy": "guard", "address": "169.254.1.1", "port": 8080}})
        await create(
            kmock, SN, "good", {"spec": {"guardProxy": "guard", "address": "localhost", "port": health_server["port"]}}
        )
        await eventually(lambda: slice_addresses(kmock) == ["localhost"], "the good node serves")
        for name, why in (("bad", "loopback"), ("link", "link-local")):
            st = await eventually(lambda n=name: objects(kmock, SN)[n].get("status"), f"{name} has a status")
            assert st["healthy"] is False and why in st["message"], st
        degraded = await eventually(
            lambda: next(c for c in gp_status(kmock)["conditions"] if c["type"] == "Degraded"), "conditions"
        )
        assert degraded["status"] == "False", degraded
        assert not [w for w in kmock.writes if w[0] == "POST" and "endpointslices" in w[1] and "127.0.0.1" in w[1]]


# -- deletion needs no operator --------------------------------------------------------------------------------


async def test_no_finalizer_so_deleting_the_namespace_without_the_operator_leaves_nothing(kmock: ApiServer) -> None:
    """`helm uninstall` removes the operator together with a GuardProxy it made: nothing may be left
    Terminating (a finalizer whose controller is gone would keep the GuardProxy and its namespace)."""
    declare(kmock)
    async with running_operator(kmock):
        await create(kmock, GP, "guard", SPEC)
        await create(kmock, SN, "mini", {"spec": {"guardProxy": "guard", "address": "localhost", "port": 1}})
        await eventually(lambda: handled(kmock), "reconciled")
        await eventually(lambda: objects(kmock, SN)["mini"].get("status"), "the ScanNode probed")
        assert not objects(kmock, GP)["guard"]["metadata"].get("finalizers")
        assert not objects(kmock, SN)["mini"]["metadata"].get("finalizers")
    # The operator is gone; the namespace goes. (A new client: kopf's shutdown cancelled the old one's tasks.)
    async with aiohttp.ClientSession(str(kmock.url)) as client:
        async with client.delete(f"/api/v1/namespaces/{NS}") as resp:
            assert resp.status == 200
        async with client.get(f"/api/v1/namespaces/{NS}") as resp:
            assert resp.status == 404, await resp.text()
    assert not children(kmock)["deployments"] and not objects(kmock, GP)


# -- the schema and the CLI refuse what the API server would --------------------------------------------------


def _address_rules() -> list[str]:
    import re

    import yaml

    crd = yaml.safe_load((pathlib.Path(inprocess.__file__).parent / "crds" / "scannodes.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["address"]
    # The rules are `!self.matches('RE')` / `!self.lowerAscii().matches('RE')`: RE2 syntax that Python's re
    # reads the same way for these patterns.
    return [re.search(r"matches\('(.*)'\)", r["rule"]).group(1) for r in schema["x-kubernetes-validations"]]


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.1", "169.254.169.254", "0.0.0.0", "::1", "FE80::1", "::"])
def test_the_crd_and_the_cli_refuse_addresses_an_endpointslice_cannot_hold(address: str) -> None:
    import re

    from ollama_guard_operator.nodecli import build_parser
    from ollama_guard_operator.spec import address_problem

    assert any(re.match(rule, address.lower()) for rule in _address_rules()), address
    assert address_problem(address) is not None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["register", "--guardproxy", "g", "--address", f"[{address}]:8080"])


@pytest.mark.parametrize("address", ["192.168.1.20", "10.0.0.9", "2001:db8::7", "mini-1.lan", "localhost"])
def test_the_crd_and_the_cli_accept_routable_addresses_and_names(address: str) -> None:
    import re

    from ollama_guard_operator.spec import address_problem

    assert not any(re.match(rule, address.lower()) for rule in _address_rules()), address
    assert address_problem(address) is None


def test_a_uid_without_a_passwd_entry_still_gets_a_user_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import getpass

    from ollama_guard_operator import __main__ as entry

    def no_entry() -> str:
        raise KeyError("getpwuid(): uid not found: 1000740000")

    monkeypatch.setattr(getpass, "getuser", no_entry)
    monkeypatch.delenv("USER", raising=False)
    entry._ensure_user()
    assert os.environ["USER"] == f"uid-{os.getuid()}"


def test_run_options_name_the_peering_only_when_peering() -> None:
    from ollama_guard_operator import __main__ as entry

    assert "peering_name" not in entry.run_options(None, True, "http://x/healthz")
    assert entry.run_options(["ai"], False, "http://x/healthz")["peering_name"] == "ollama-guard-operator"
