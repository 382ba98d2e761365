"""API-key auth of the chart's GuardProxy: on by default, a generated key whose SHA-256 the proxy accepts.

Rendered by helm 3 and helm 4; the keys file is read by the proxy's own loader and settings, as in the pod.
"""

from __future__ import annotations

import base64
import hashlib
import pathlib
from typing import Any

import pytest
import yaml

from .conftest import CHART, by_kind, helm_notes, one, template, template_fails

pytestmark = pytest.mark.helm

ENABLED = ("--set", "guardProxy.enabled=true")
KEY_SECRET = "og-ollama-guard-api-key"
KEYS_SECRET = "og-ollama-guard-api-keys"


def secrets(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in by_kind(docs, "Secret")}


def decoded(secret: dict[str, Any], key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


def generated(helm: str, *extra: str) -> tuple[dict[str, Any], str, str]:
    """The GuardProxy, the generated key and the keys file of a render with guardProxy and default auth."""
    docs = template(helm, extra=(*ENABLED, *extra))
    found = secrets(docs)
    assert set(found) == {KEY_SECRET, KEYS_SECRET}
    return one(docs, "GuardProxy"), decoded(found[KEY_SECRET], "key"), decoded(found[KEYS_SECRET], "keys.yaml")


def proxy_env(keys_file: pathlib.Path, gp: dict[str, Any]) -> dict[str, str]:
    """The proxy container's environment as the operator builds it for this GuardProxy, with the Secret's
    file at keys_file instead of its mount path and no config file."""
    from ollama_guard_operator import builders
    from ollama_guard_operator.spec import parse_guardproxy

    spec = parse_guardproxy(gp["spec"])
    owner = builders.Owner(gp["metadata"]["name"], gp["metadata"]["namespace"], "uid")
    dep = builders.deployment(owner, spec, "cpu", spec.variants.cpu)
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    mounted = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}["api-keys"]
    assert mounted["secret"]["secretName"] == KEYS_SECRET
    assert env["OLLAMA_GUARD_API_KEYS_FILE"] == "/var/run/ollama-guard/api-keys/keys.yaml"
    env["OLLAMA_GUARD_API_KEYS_FILE"] = str(keys_file)
    del env["OLLAMA_GUARD_CONFIG"]
    return env


def test_guardproxy_references_the_generated_keys_secret(helm: str) -> None:
    gp, key, _ = generated(helm)
    assert gp["spec"]["auth"] == {"apiKeysSecret": {"name": KEYS_SECRET, "key": "keys.yaml"}}
    assert key.startswith("og-") and len(key) == 51 and key[3:].isalnum()


def test_key_secret_is_kept_and_the_keys_file_holds_its_sha256(helm: str, tmp_path: pathlib.Path) -> None:
    from ollama_guard.security import _load_keys_file

    docs = template(helm, extra=ENABLED)
    found = secrets(docs)
    assert found[KEY_SECRET]["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert "annotations" not in found[KEYS_SECRET]["metadata"]  # derived: helm may delete and re-create it
    key = decoded(found[KEY_SECRET], "key")
    path = tmp_path / "keys.yaml"
    path.write_text(decoded(found[KEYS_SECRET], "keys.yaml"))
    (entry,) = _load_keys_file(str(path))
    assert entry.name == "default"
    assert entry.sha256 == hashlib.sha256(key.encode()).hexdigest()


def test_each_render_without_a_cluster_draws_a_new_key(helm: str) -> None:
    """`helm template` cannot look up the Secret; on a cluster, install and upgrade reuse it (lookup)."""
    first = generated(helm)[1]
    second = generated(helm, "--set", "guardProxy.labels.render=second")[1]
    assert first != second
    text = (CHART / "templates" / "guardproxy-auth.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in text


def test_the_pod_settings_accept_the_generated_key_and_nothing_else(helm: str, tmp_path: pathlib.Path) -> None:
    """End to end: the operator's env for the rendered GuardProxy, the rendered keys file, the proxy's settings
    loader and authenticator."""
    from ollama_guard.security import Authenticator
    from ollama_guard.settings import load_settings

    gp, key, keys_yaml = generated(helm)
    path = tmp_path / "keys.yaml"
    path.write_text(keys_yaml)
    env = proxy_env(path, gp)
    assert env["OLLAMA_GUARD_AUTH__ENABLED"] == "true"
    settings = load_settings(environ=env)
    assert settings.auth.enabled is True
    auth = Authenticator(settings.auth)
    principal = auth.check_key(key)
    assert principal is not None and principal.name == "default"
    assert auth.check_key("og-" + "x" * 48) is None
    assert auth.check_key(key + "x") is None
    assert auth.check_key(None) is None
    assert Authenticator.presented({b"authorization": f"Bearer {key}".encode()}) == key


def test_auth_disabled_renders_no_auth_and_no_secrets(helm: str, tmp_path: pathlib.Path) -> None:
    from ollama_guard.security import Authenticator
    from ollama_guard.settings import load_settings

    docs = template(helm, extra=(*ENABLED, "--set", "guardProxy.auth.enabled=false"))
    assert not by_kind(docs, "Secret")
    gp = one(docs, "GuardProxy")
    assert "auth" not in gp["spec"]
    from ollama_guard_operator import builders
    from ollama_guard_operator.spec import parse_guardproxy

    spec = parse_guardproxy(gp["spec"])
    (container,) = builders.deployment(builders.Owner("g", "ns", "uid"), spec, "cpu", spec.variants.cpu)["spec"][
        "template"
    ]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert "OLLAMA_GUARD_AUTH__ENABLED" not in env
    del env["OLLAMA_GUARD_CONFIG"]
    assert Authenticator(load_settings(environ=env).auth).enabled is False


def test_existing_secret_generates_nothing_and_is_referenced(helm: str) -> None:
    docs = template(
        helm,
        extra=(*ENABLED, "--set", "guardProxy.auth.existingSecret=team-keys", "--set", "guardProxy.auth.key=k.yaml"),
    )
    assert not by_kind(docs, "Secret")
    gp = one(docs, "GuardProxy")
    assert gp["spec"]["auth"] == {"apiKeysSecret": {"name": "team-keys", "key": "k.yaml"}}


def test_existing_secret_keeps_other_auth_settings(helm: str) -> None:
    docs = template(
        helm,
        extra=(
            *ENABLED,
            "--set",
            "guardProxy.auth.existingSecret=team-keys",
            "--set",
            "guardProxy.spec.auth.adminTokenSecret.name=admin",
        ),
    )
    assert one(docs, "GuardProxy")["spec"]["auth"] == {
        "apiKeysSecret": {"name": "team-keys", "key": "keys.yaml"},
        "adminTokenSecret": {"name": "admin"},
    }


def test_api_keys_secret_in_the_spec_is_refused_while_the_chart_manages_auth(helm: str) -> None:
    err = template_fails(helm, *ENABLED, "--set", "guardProxy.spec.auth.apiKeysSecret.name=mine")
    assert "guardProxy.auth.existingSecret" in err, err
    docs = template(
        helm,
        extra=(
            *ENABLED,
            "--set",
            "guardProxy.auth.enabled=false",
            "--set",
            "guardProxy.spec.auth.apiKeysSecret.name=mine",
        ),
    )
    assert one(docs, "GuardProxy")["spec"]["auth"] == {"apiKeysSecret": {"name": "mine"}}


@pytest.mark.parametrize(
    "flag",
    [
        "guardProxy.auth.enabled=yes",
        "guardProxy.auth.existingSecret=Not_A_Name",
        "guardProxy.auth.key=a/b",
        "guardProxy.auth.apiKey=og-123",
    ],
)
def test_schema_rejects_wrong_auth_values(helm: str, flag: str) -> None:
    setter = "--set-string" if flag.endswith("=yes") else "--set"
    err = template_fails(helm, *ENABLED, setter, flag)
    assert "values don't meet the specifications of the schema" in err, err


def test_auth_is_on_by_default_in_values() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["guardProxy"]["auth"] == {"enabled": True, "existingSecret": "", "key": "keys.yaml"}


def test_helm_test_hook_only_checks_health(helm: str) -> None:
    """The hook needs no key: /health is open, and the hook pod mounts no Secret."""
    (pod,) = by_kind(template(helm, extra=ENABLED), "Pod")
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["URL"].endswith("/health")
    assert "volumes" not in pod["spec"] and "Authorization" not in "\n".join(container["command"])


def notes(tmp_path: pathlib.Path, *args: str) -> str:
    return helm_notes(tmp_path, *ENABLED, *args)


def test_notes_tell_how_to_read_the_key_and_send_it(tmp_path: pathlib.Path) -> None:
    text = notes(tmp_path)
    assert f"KEY=$(kubectl -n guard get secret {KEY_SECRET} -o jsonpath='{{.data.key}}' | base64 -d)" in text
    assert 'curl http://127.0.0.1:8080/api/tags -H "Authorization: Bearer $KEY"' in text


def test_notes_with_an_existing_secret_or_no_auth(tmp_path: pathlib.Path) -> None:
    text = notes(tmp_path, "--set", "guardProxy.auth.existingSecret=team-keys")
    assert "Secret team-keys" in text and "get secret" not in text
    text = notes(tmp_path, "--set", "guardProxy.auth.enabled=false")
    assert "API-key auth is off" in text and "Bearer" not in text
