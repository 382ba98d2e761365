"""One large or hostile request cannot stall the others: Secrets' cost is linear (each line runs only the
detect-secrets plugins that can match it), each request has a scan budget that fails it closed with a 413,
and the scan pool's threads are shared round-robin by request with a cap per request."""

from __future__ import annotations

import asyncio
import random
import string
import threading

import httpx
import pytest
from ollama_guard.scanning import budget, registry

from .conftest import wait_for

registry._install_package_stubs()
from ollama_guard.scanning import secrets  # noqa: E402


def hostile_text(chars: int, seed: int = 1) -> str:
    """Short `k=<random>` lines: every one matches detect-secrets' base64 expression (the report's input)."""
    rng = random.Random(seed)
    lines, n = [], 0
    while n < chars:
        line = "k=" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(10))
        lines.append(line)
        n += len(line) + 1
    return "\n".join(lines)[:chars]


def test_each_line_runs_only_the_plugins_its_text_can_match(monkeypatch):
    scanner = secrets.Secrets(redact_mode="all")
    calls = []
    real = secrets._scan_line
    monkeypatch.setattr(secrets, "_scan_line", lambda **kw: (calls.append(kw["plugin"]), real(**kw))[1])
    text = hostile_text(20_000)
    lines = text.count("\n") + 1
    scanner.scan(text)
    # detect-secrets' own scan runs every plugin (~110) on every line; here at most the two entropy ones.
    assert len(calls) <= 2 * lines
    assert len(secrets.get_plugins()) > 100


def test_a_scan_past_its_deadline_stops_within_a_line():
    scanner = secrets.Secrets(redact_mode="all")
    import time

    previous = budget.enter(time.monotonic() - 1)
    try:
        with pytest.raises(budget.ScanBudgetExceeded):
            scanner.scan(hostile_text(5_000))
    finally:
        budget.leave(previous)
    budget.check()  # the deadline is gone with the job: later scans on this thread run


def test_waiting_jobs_get_slots_round_robin_by_request():
    async def main() -> list[str]:
        slots = budget.FairSlots(capacity=1, per_owner=1)
        order: list[str] = []
        gate = asyncio.Event()

        async def job(owner: str, name: str) -> None:
            async with slots.slot(owner):
                order.append(name)
                await gate.wait()

        first = asyncio.create_task(job("A", "a0"))
        await asyncio.sleep(0)  # a0 holds the slot
        tasks = [asyncio.create_task(job("A", f"a{i}")) for i in range(1, 4)]
        tasks.append(asyncio.create_task(job("B", "b1")))
        tasks.append(asyncio.create_task(job("C", "c1")))
        for _ in range(3):
            await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(first, *tasks)
        return order

    # FIFO would run a1 a2 a3 before b1 and c1.
    assert asyncio.run(main()) == ["a0", "a1", "b1", "c1", "a2", "a3"]


def test_one_request_holds_at_most_its_share_of_the_threads():
    async def main() -> tuple[int, int]:
        slots = budget.FairSlots(capacity=4, per_owner=2)
        gate = asyncio.Event()
        running: dict[str, int] = {"A": 0, "B": 0}
        peak = {"A": 0}

        async def job(owner: str) -> None:
            async with slots.slot(owner):
                running[owner] += 1
                peak["A"] = max(peak["A"], running["A"])
                await gate.wait()
                running[owner] -= 1

        hostile = [asyncio.create_task(job("A")) for _ in range(8)]
        for _ in range(3):
            await asyncio.sleep(0)
        normal = asyncio.create_task(job("B"))
        await asyncio.sleep(0)
        started_b = running["B"]
        gate.set()
        await asyncio.gather(normal, *hostile)
        return peak["A"], started_b

    peak_a, started_b = asyncio.run(main())
    assert peak_a == 2 and started_b == 1  # B ran at once, beside A's two


HOSTILE_BODY = {
    "model": "m",
    "stream": False,
    "messages": [{"role": "user", "content": hostile_text(95_000, seed)} for seed in range(6)],
}


@pytest.mark.parametrize(
    ("route", "error_of"),
    [
        ("/api/chat", lambda j: j["error"]),
        ("/v1/chat/completions", lambda j: j["error"]["message"]),
    ],
)
def test_a_request_over_its_scan_budget_gets_a_413_and_is_not_forwarded(start_proxy, upstream, route, error_of):
    p = start_proxy(limits={"scan_budget_seconds": 0.05})
    before = len(upstream.requests)
    r = httpx.post(p.url + route, json=HOSTILE_BODY, timeout=120)
    assert r.status_code == 413, r.text
    assert "budget (0.05 s of scanning per request)" in error_of(r.json())
    assert len(upstream.requests) == before
    ok = httpx.post(
        p.url + route, json={"model": "m", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert ok.status_code == 200


def test_a_normal_request_is_answered_while_a_hostile_one_is_still_scanning(start_proxy):
    p = start_proxy()
    engine = p.state.engine
    hostile_done = threading.Event()

    def send_hostile() -> None:
        httpx.post(p.url + "/api/chat", json=HOSTILE_BODY, timeout=300)
        hostile_done.set()

    threading.Thread(target=send_hostile, daemon=True).start()
    wait_for(lambda: engine._threads.used >= 1, 60, "the hostile request's scans running")
    normal = httpx.post(
        p.url + "/api/chat",
        json={"model": "m", "stream": False, "messages": [{"role": "user", "content": "What is a pod?"}]},
        timeout=300,
    )
    assert normal.status_code == 200
    assert not hostile_done.is_set(), "the normal request was answered before the hostile one finished"
    hostile_done.wait(300)


def test_short_texts_are_scanned_on_the_event_loop_except_by_site_regexes():
    """A hand-off to a pool thread costs more than a short scan; a site's own Regex could backtrack for
    seconds, so it always runs on a pool thread (where the event loop keeps running beside it)."""
    from ollama_guard.scanning.engine import ScanEngine
    from ollama_guard.scanning.policy import build_policy
    from ollama_guard.settings import load_settings

    def threads_used(scanners: list[dict]) -> set[str]:
        settings = load_settings(overrides={"input_scanners": scanners, "output_scanners": []}, environ={})
        engine = ScanEngine(build_policy(settings), settings)
        names: set[str] = set()
        for s in engine.policy.input:
            real = s.instance.scan

            def spy(text: str, real=real) -> object:
                names.add(threading.current_thread().name)
                return real(text)

            s.instance.scan = spy
        try:
            asyncio.run(engine.scan("input", "a short prompt"))
            asyncio.run(engine.scan("input", "x " * 2_000))
        finally:
            engine.close()
        return names

    inline = threads_used([{"type": "Secrets"}, {"type": "InvisibleText"}])
    assert inline == {"MainThread", next(n for n in inline if n.startswith("scan"))}
    assert all(n.startswith("scan") for n in threads_used([{"type": "Regex", "params": {"patterns": ["x+y"]}}]))


def test_results_are_reported_in_the_policys_order_on_the_event_loop_and_on_a_thread():
    """The chain runs detectors first, then sanitizers; a verdict still lists its results in the order the
    policy names the scanners, whether the text was scanned inline (short) or on a pool thread (long), and
    when a blocking detector cut the chain short."""
    from ollama_guard.scanning.engine import ScanEngine
    from ollama_guard.scanning.policy import build_policy
    from ollama_guard.settings import load_settings

    scanners = [
        {"type": "InvisibleText"},
        {"type": "Secrets", "action": "sanitize"},
        {"type": "BanSubstrings", "params": {"substrings": ["forbidden"]}},
        {"type": "TokenLimit", "params": {"limit": 100_000}},
    ]
    names = ["InvisibleText", "Secrets", "BanSubstrings", "TokenLimit"]
    for short_circuit in (False, True):
        settings = load_settings(
            overrides={"input_scanners": scanners, "output_scanners": [], "short_circuit": short_circuit},
            environ={},
        )
        engine = ScanEngine(build_policy(settings), settings)
        try:
            for text in ("a short prompt", "a long prompt " * 400):
                verdict = asyncio.run(engine.scan("input", text))
                assert [r.scanner for r in verdict.results] == names, (short_circuit, len(text))
                blocked = asyncio.run(engine.scan("input", text + " forbidden"))
                assert blocked.blocked
                ran = [r.scanner for r in blocked.results]
                expected = ["InvisibleText", "BanSubstrings"] if short_circuit else names
                assert ran == expected, (short_circuit, len(text))
        finally:
            engine.close()
