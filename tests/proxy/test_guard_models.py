"""Guard models served by Ollama (Llama Guard 3, ShieldGemma, Granite Guardian) as scanners: each family's
answer format, fail-closed on anything else, over real HTTP against the fake Ollama speaking those formats."""

from __future__ import annotations

import httpx
import pytest
from ollama_guard.scanning.guard_models import GuardModelError, OllamaGuard, parse_answer

ALL = frozenset(f"S{i}" for i in range(1, 15))


@pytest.mark.parametrize(
    ("family", "answer", "flagged"),
    [
        ("llama-guard", "safe", False),
        ("llama-guard", "unsafe\nS1", True),
        ("llama-guard", " unsafe\nS10,S2 \n", True),
        ("shieldgemma", "Yes", True),
        ("shieldgemma", "No", False),
        ("granite-guardian", "Yes", True),
        ("granite-guardian", "no", False),
    ],
)
def test_each_family_answer_is_read(family, answer, flagged):
    assert parse_answer(family, answer, ALL)[0] is flagged


@pytest.mark.parametrize(
    ("family", "answer"),
    [
        ("llama-guard", ""),
        ("llama-guard", "unsafe"),
        ("llama-guard", "unsafe\nviolence"),
        ("llama-guard", "safe\nbut wait"),
        ("llama-guard", "I think it is fine"),
        ("shieldgemma", "Maybe"),
        ("shieldgemma", "Yes\nNo"),
        ("granite-guardian", "Sure, here is"),
    ],
)
def test_an_answer_out_of_format_is_an_error(family, answer):
    with pytest.raises(GuardModelError):
        parse_answer(family, answer, ALL)


def test_only_the_configured_categories_block():
    assert parse_answer("llama-guard", "unsafe\nS1", frozenset({"S10"})) == (False, ["S1"])
    assert parse_answer("llama-guard", "unsafe\nS1,S10", frozenset({"S10"})) == (True, ["S1", "S10"])


def test_the_conversation_judged_has_the_answer_and_granites_risk():
    out = OllamaGuard("granite3-guardian", "granite-guardian", ollama_url="http://x", direction="output", risk="harm")
    assert out.messages("the answer", "the question") == [
        {"role": "system", "content": "harm"},
        {"role": "user", "content": "the question"},
        {"role": "assistant", "content": "the answer"},
    ]


FAMILY_MODELS = {
    "llama-guard": "llama-guard3:1b",
    "shieldgemma": "shieldgemma:2b",
    "granite-guardian": "granite3-guardian:2b",
}


def guard(family: str, **params: object) -> dict:
    return {"type": "OllamaGuard", "params": {"model": FAMILY_MODELS[family], "family": family, **params}}


def chat(p, text: str, stream: bool = False, path: str = "/api/chat") -> httpx.Response:
    body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": text}]}
    return httpx.post(p.url + path, json=body, timeout=30)


def sent_to_chat_model(upstream, text: str) -> bool:
    return any(
        r["path"] in ("/api/chat", "/v1/chat/completions")
        and r["body"].get("model") == "m"
        and text in str(r["body"].get("messages"))
        for r in upstream.requests
    )


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_a_prompt_the_guard_model_flags_is_refused_and_never_forwarded(start_proxy, upstream, family):
    p = start_proxy(input_scanners=[guard(family)], output_scanners=[])
    r = chat(p, "GUARD-UNSAFE tell me how to do harm")
    assert r.status_code == 403, r.text
    assert "OllamaGuard" in r.headers["x-guard-decision"]
    assert not sent_to_chat_model(upstream, "GUARD-UNSAFE tell me")
    # The guard model was asked on Ollama itself, with the prompt as its user turn.
    asked = [r for r in upstream.requests if r["body"].get("model") == FAMILY_MODELS[family]]
    assert asked and "GUARD-UNSAFE tell me how to do harm" in str(asked[-1]["body"]["messages"])
    ok = chat(p, "What is a Kubernetes pod?")
    assert ok.status_code == 200 and sent_to_chat_model(upstream, "What is a Kubernetes pod?")


def test_an_answer_the_guard_model_flags_never_reaches_the_client(start_proxy):
    p = start_proxy(input_scanners=[], output_scanners=[guard("llama-guard")])
    whole = chat(p, "REPLY: Sure. GUARD-UNSAFE-S9 here is how.")
    assert whole.status_code == 403 and "GUARD-UNSAFE" not in whole.text
    streamed = chat(p, "REPLY: Sure. GUARD-UNSAFE-S9 here is how.", stream=True)
    assert streamed.status_code == 200 and "GUARD-UNSAFE" not in streamed.text
    assert '"done_reason":"guard_blocked"' in streamed.text.replace(" ", "")
    assert chat(p, "REPLY: Pods are the smallest deployable units.").status_code == 200


def test_categories_choose_what_blocks(start_proxy):
    p = start_proxy(input_scanners=[guard("llama-guard", categories=["S10"])], output_scanners=[])
    assert chat(p, "GUARD-UNSAFE-S1 a crime question").status_code == 200
    assert chat(p, "GUARD-UNSAFE-S10 a hateful one").status_code == 403


@pytest.mark.parametrize(("fail_closed", "status"), [(True, 503), (False, 200)])
def test_an_unreadable_guard_answer_follows_block_on_guard_error(start_proxy, fail_closed, status):
    p = start_proxy(input_scanners=[guard("shieldgemma")], output_scanners=[], block_on_guard_error=fail_closed)
    assert chat(p, "GUARD-MALFORMED is this fine?").status_code == status


def test_verdicts_are_cached_per_message(start_proxy, upstream):
    p = start_proxy(input_scanners=[guard("granite-guardian", risk="jailbreak")], output_scanners=[])

    def asked() -> int:
        return sum(1 for r in upstream.requests if r["body"].get("model") == FAMILY_MODELS["granite-guardian"])

    before = asked()
    for _ in range(3):
        assert chat(p, "How do I drain a node before maintenance?").status_code == 200
    assert asked() == before + 1
    risk = [r for r in upstream.requests if r["body"].get("model") == FAMILY_MODELS["granite-guardian"]][-1]
    assert risk["body"]["messages"][0] == {"role": "system", "content": "jailbreak"}


def test_health_and_ready_say_when_ollama_lacks_the_guard_model(start_proxy):
    cfg = {"type": "OllamaGuard", "required": True, "params": {"model": "missing-guard", "family": "llama-guard"}}
    p = start_proxy(input_scanners=[cfg], output_scanners=[])
    health = httpx.get(p.url + "/health").json()
    assert any("missing-guard" in problem and "ollama pull" in problem for problem in health["problems"])
    ready = httpx.get(p.url + "/ready")
    assert ready.status_code == 503 and "missing-guard" in ready.text
    present = start_proxy(input_scanners=[{**guard("llama-guard"), "required": True}], output_scanners=[])
    assert httpx.get(present.url + "/ready").status_code == 200


def test_a_guard_model_url_pointing_at_the_proxy_itself_is_refused(start_proxy):
    from ollama_guard.scanning.policy import build_policy
    from ollama_guard.settings import load_settings

    settings = load_settings(
        overrides={
            "proxy_port": 18080,
            "input_scanners": [guard("llama-guard", ollama_url="http://127.0.0.1:18080")],
            "output_scanners": [],
        },
        environ={},
    )
    scanner = build_policy(settings).input[0]
    assert not scanner.loaded and "is this proxy" in (scanner.missing or "")


def test_the_example_config_loads_and_its_guard_model_examples_work_uncommented(tmp_path, upstream):
    import pathlib

    from ollama_guard.scanning.policy import build_policy
    from ollama_guard.settings import load_settings

    example = pathlib.Path(__file__).resolve().parents[2] / "config.example.yaml"
    assert load_settings(config_path=example, environ={}).input_scanners is not None
    # Uncomment the OllamaGuard blocks (lines starting "  # - type: OllamaGuard" and their "  #   " lines).
    lines, out, inside = example.read_text().splitlines(), [], False
    for line in lines:
        if line.startswith("  # - type: OllamaGuard"):
            inside = True
        elif inside and not line.startswith("  #   "):
            inside = False
        out.append(line.replace("  # ", "  ", 1) if inside else line)
    enabled = tmp_path / "config.yaml"
    enabled.write_text("\n".join(out) + "\n")
    settings = load_settings(config_path=enabled, overrides={"ollama_url": upstream.url}, environ={})
    policy = build_policy(settings)
    remote = [s for s in policy.all() if s.stype.remote]
    assert len(remote) == 3 and all(s.loaded for s in remote)
    assert {s.instance.family for s in remote} == {"granite-guardian", "llama-guard"}


def llama_guard_config(tmp_path, upstream):
    """A config file with Llama Guard as the only input scanner, on the fake Ollama."""
    import yaml

    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        yaml.safe_dump({"ollama_url": upstream.url, "input_scanners": [guard("llama-guard")], "output_scanners": []})
    )
    return cfg


def run_cli(*argv: str):
    """`ollama-guard *argv` in a process of its own."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "ollama_guard.cli", *argv], capture_output=True, text=True, timeout=120
    )


def test_models_pull_has_ollama_pull_the_guard_models(tmp_path, upstream):
    out = run_cli("models", "pull", "-c", str(llama_guard_config(tmp_path, upstream)))  # as the README shows it
    assert out.returncode == 0, out.stderr
    assert "ollama pull llama-guard3:1b" in out.stdout and "success" in out.stdout
    pulls = [r for r in upstream.requests if r["path"] == "/api/pull"]
    assert pulls and pulls[-1]["body"]["model"] == "llama-guard3:1b"


@pytest.mark.parametrize(
    ("text", "verdict", "code"), [("What is a pod?", "ALLOWED", 0), ("GUARD-UNSAFE x", "BLOCKED", 1)]
)
def test_the_scan_command_asks_the_guard_model_and_closes_its_session(tmp_path, upstream, text, verdict, code):
    out = run_cli("-c", str(llama_guard_config(tmp_path, upstream)), "scan", text)
    assert out.returncode == code, out.stderr
    assert f"verdict: {verdict}" in out.stdout
    assert "Unclosed" not in out.stderr, out.stderr  # aiohttp's warning for a session left open


@pytest.mark.parametrize("fault", ["no-answer", "http500-json", "garbage", "reset"])
def test_a_guard_model_that_fails_like_a_real_upstream_fails_closed(start_proxy, upstream, fault):
    # The guard call carries the prompt, so FAULT:<name> in it makes the fake Ollama fail that call.
    cfg = {**guard("llama-guard"), "timeout": 1.0}
    p = start_proxy(input_scanners=[cfg], output_scanners=[])
    text = f"Is this fine? FAULT:{fault}"
    r = chat(p, text)
    assert r.status_code == 503 and "OllamaGuard" in r.text
    assert not sent_to_chat_model(upstream, text)
