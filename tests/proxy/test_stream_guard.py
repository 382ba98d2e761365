"""The incremental streaming scanner: release only what passed, catch splits, linear work."""

from __future__ import annotations

import asyncio

import pytest
from ollama_guard.scanning.engine import ScanEngine
from ollama_guard.scanning.policy import build_policy
from ollama_guard.scanning.stream import StreamGuard
from ollama_guard.settings import load_settings

from .policies import AWS, BANNED_OUT, pure


@pytest.fixture(scope="module")
def engine():
    settings = load_settings(overrides=pure(), environ={})
    eng = ScanEngine(build_policy(settings), settings)
    yield eng
    eng.close()


def run(coro):
    return asyncio.run(coro)


async def feed_all(guard: StreamGuard, text: str, size: int):
    released_history = []
    for i in range(0, len(text), size):
        step = await guard.feed(text[i : i + size])
        released_history.append(guard.text[: step.release_to])
        if step.violation:
            return released_history, step
    step = await guard.finish()
    released_history.append(guard.text[: step.release_to])
    return released_history, step


@pytest.mark.parametrize("size", [1, 2, 5, 13, 64, 500])
def test_violation_split_across_chunks_is_caught_before_any_of_it_is_released(engine, size):
    text = "x " * 150 + BANNED_OUT + " tail text " * 10
    guard = StreamGuard(engine, engine.settings)
    history, step = run(feed_all(guard, text, size))
    assert step.violation is not None and "BanSubstrings" in step.violation.blocked_by
    for released in history:
        assert "FORBIDDEN" not in released and not BANNED_OUT.startswith(released[-3:] or "#")


@pytest.mark.parametrize("size", [1, 4, 9])
def test_text_is_released_only_after_it_passed_and_all_of_it_at_the_end(engine, size):
    text = "A calm sentence about gardening. " * 40
    guard = StreamGuard(engine, engine.settings)
    history, step = run(feed_all(guard, text, size))
    assert step.violation is None
    # Released text only grows, trails the received text by the hold-back, and ends complete.
    for earlier, later in zip(history, history[1:], strict=False):
        assert later.startswith(earlier)
    assert history[-1] == text
    assert any(0 < len(h) < len(text) for h in history), "text was released progressively"


def test_secret_in_stream_is_redacted_before_release(engine):
    text = "Your credentials are ready. The key is " + AWS + " and it works. " + "More prose follows. " * 20
    guard = StreamGuard(engine, engine.settings)
    history, step = run(feed_all(guard, text, 3))
    assert step.violation is None
    assert all(AWS not in h and "AKIA" not in h for h in history)
    assert "******" in history[-1] and history[-1].endswith("More prose follows. ")


@pytest.mark.parametrize("size", [1, 4])
def test_scan_work_grows_linearly_with_answer_length(engine, size):
    work = {}
    for n in (2_000, 8_000, 32_000):
        text = ("lorem ipsum dolor sit amet " * (n // 27 + 1))[:n]
        guard = StreamGuard(engine, engine.settings)
        run(feed_all(guard, text, size))
        work[n] = guard.scanned_chars / n
    # Characters scanned per character of answer stay flat as the answer grows 16x (a scanner that
    # re-scans the whole answer per chunk would grow 16x), and stay under the design bound:
    # each character is seen by each pattern scanner in about (overlap + step) / step windows.
    assert max(work.values()) <= 1.2 * min(work.values())
    bound = len(guard.pattern) * (guard.overlap + guard.step) / guard.step + 1
    assert max(work.values()) <= bound


def test_long_token_secret_longer_than_the_overlap_is_never_released_in_part(engine):
    import base64
    import json

    def b64(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    jwt = b64({"alg": "HS256", "typ": "JWT"}) + "." + b64({"sub": "user", "data": "x" * 400}) + "." + "s1gnatureAbC"
    assert len(jwt) > 2 * engine.settings.stream.default_overlap
    text = "Here is the token you asked for: " + jwt + " and some closing words. " * 8
    guard = StreamGuard(engine, engine.settings)
    history, step = run(feed_all(guard, text, 3))
    assert step.violation is None
    assert all(jwt[:12] not in h for h in history)
    assert "******" in history[-1] and history[-1].endswith("closing words. ")


def test_keyword_prefixed_long_token_is_caught_across_chunks():
    # A pattern whose last word is longer than the overlap, with a keyword before it: the window always
    # reaches `overlap` characters before the running word, so the keyword is seen with the whole token.
    settings = load_settings(
        overrides={
            "input_scanners": [],
            "output_scanners": [
                {"type": "Regex", "action": "block", "params": {"patterns": [r"api_key\s*=\s*[A-Z0-9]{150}"]}}
            ],
        },
        environ={},
    )
    eng = ScanEngine(build_policy(settings), settings)
    try:
        key = "AB12CD34EF" * 15
        text = "Some words before. Your config line is api_key = " + key + " and that is all. " * 5
        for size in (1, 3, 8):
            guard = StreamGuard(eng, settings)
            history, step = run(feed_all(guard, text, size))
            assert step.violation is not None and step.violation.blocked_by == ["Regex"]
            assert all("api_key = AB12" not in h for h in history)
    finally:
        eng.close()


@pytest.fixture(scope="module")
def default_engine():
    """The default policy without model weights: Secrets is the one output pattern scanner."""
    settings = load_settings(overrides={"models_path": "/nonexistent-models"}, environ={})
    eng = ScanEngine(build_policy(settings), settings)
    assert [s.name for s in eng.policy.active("output")] == ["Secrets"]
    yield eng
    eng.close()


def test_the_first_word_is_released_as_soon_as_it_ends_under_the_default_policy(default_engine):
    # Secrets redacts values, never their keyword: only the running word is held back, so text is visible
    # from the first word on (at ~30 tokens/s, 80 held characters were ~0.65 s before anything showed).
    guard = StreamGuard(default_engine, default_engine.settings)
    assert guard.hold == 0 and guard.overlap == default_engine.settings.stream.default_overlap
    assert run(guard.feed("Sure")).release_to == 0
    step = run(guard.feed(", here"))
    assert guard.text[: step.release_to] == "Sure, "


@pytest.mark.parametrize("size", [1, 3, 7])
def test_a_value_whose_keyword_was_already_released_is_still_redacted(default_engine, size):
    # detect-secrets' AWS rule needs "aws", a keyword and the quoted 40-character value within 20 characters
    # of each other; it reports the value. The context went out first and is scanned with the value all the same.
    value = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYZXAMPLEKEY"
    text = 'Use this line in your config file:\naws_secret_access_key = "' + value + '"\nThen restart. ' * 4
    guard = StreamGuard(default_engine, default_engine.settings)
    history, step = run(feed_all(guard, text, size))
    assert step.violation is None
    assert any("aws_secret_access_key" in h and "******" not in h for h in history), "context out before value"
    assert all(value[:6] not in h for h in history)
    assert 'aws_secret_access_key = "******"' in history[-1] and history[-1].endswith("Then restart. ")


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11, 50])
def test_no_line_of_a_streamed_private_key_is_released(default_engine, size):
    # The header stays in each window (the body collapses to one ******), so every body line is redacted as
    # it arrives, and the END line and the text after it come through.
    import random

    from ollama_guard.testing.secret_corpus import GENERATORS

    pem, body_lines = GENERATORS["private-key"][1](random.Random(size))
    text = "Here it is:\n" + pem + "\nKeep it safe and rotate it every 90 days.\n"
    guard = StreamGuard(default_engine, default_engine.settings)
    history, step = run(feed_all(guard, text, size))
    assert step.violation is None
    assert all(line[:10] not in h for line in body_lines for h in history)
    assert history[-1].endswith("-----END RSA PRIVATE KEY-----\nKeep it safe and rotate it every 90 days.\n")


class _Upstream:
    """An aiohttp response whose body arrives in the given reads (`content.readany()`: the next read, then b""
    for ever once the body has ended, as aiohttp's StreamReader does)."""

    def __init__(self, reads: list[bytes]) -> None:
        self.reads = list(reads)
        self.content = self

    async def readany(self) -> bytes:
        return self.reads.pop(0) if self.reads else b""

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


def _relay(engine, path: str, reads: list[bytes]) -> bytes:
    from ollama_guard.dialects import ROUTES
    from ollama_guard.relay import GuardedStream

    async def go() -> bytes:
        stream = GuardedStream(
            _Upstream(reads), ROUTES[path], lambda side: StreamGuard(engine, engine.settings, side=side), "m", "stop"
        )
        return b"".join([b async for b in stream.__aiter__()])

    return run(go())


def _ndjson_chunks(secret: bool) -> list[bytes]:
    import orjson

    def chunk(**message) -> bytes:
        return orjson.dumps({"model": "m", "message": {"role": "assistant", **message}, "done": False}) + b"\n"

    words = (
        ("The ", "answer ", "is ", "here, ", "key ")
        + ((AWS[:8], AWS[8:]) if secret else ("none", " here"))
        + (" done. ",)
    )
    lines = [chunk(content="")]
    lines += [chunk(thinking=w) for w in ("Let ", "me ", "think. ")]
    lines += [chunk(content=w) for w in words]
    lines.append(chunk(content="", tool_calls=[{"function": {"name": "f", "arguments": {"q": "x"}}}]))
    lines += [chunk(content=w) for w in ("And ", "more ", "text.")]
    lines.append(b"\n")  # a blank line: no event
    lines.append(orjson.dumps({"model": "m", "message": {"role": "assistant", "content": ""}, "done": True}) + b"\n")
    return lines


def _texts(out: bytes) -> tuple[str, str, int, bool]:
    import orjson

    events = [orjson.loads(line) for line in out.splitlines() if line.strip()]
    messages = [e.get("message", {}) for e in events]
    return (
        "".join(m.get("content", "") for m in messages),
        "".join(m.get("thinking", "") for m in messages),
        sum(1 for m in messages if m.get("tool_calls")),
        events[-1].get("done") is True,
    )


@pytest.mark.parametrize("secret", [False, True], ids=["clean", "a secret redacted"])
def test_what_the_client_gets_does_not_depend_on_how_the_upstream_bytes_were_read(engine, secret: bool) -> None:
    # Events of one network read but the last are queued without a scan each (GuardedStream._plain, _queue), and
    # scanned with the last: the client's stream must not depend on how Ollama's bytes were split into reads.
    # Thinking, answer text (with a secret split across chunks), a tool call, a blank line, the final chunk.
    lines = _ndjson_chunks(secret)
    blob = b"".join(lines)
    one_by_one = _relay(engine, "/api/chat", lines)
    together = _relay(engine, "/api/chat", [blob])
    mid_line = _relay(engine, "/api/chat", [blob[i : i + 37] for i in range(0, len(blob), 37)])
    assert _texts(together) == _texts(one_by_one) == _texts(mid_line)
    content, thinking, calls, done = _texts(one_by_one)
    assert thinking == "Let me think. " and calls == 1 and done and content.endswith("And more text.")
    if secret:
        assert AWS not in content and "******" in content  # scanned, however it arrived
    else:
        # Nothing rewritten: every chunk goes out as Ollama sent it, in every case.
        assert together == one_by_one == mid_line == b"".join(line for line in lines if line.strip())


def test_guards_of_two_policies_in_one_process_each_use_their_own_scanners(engine, default_engine) -> None:
    # A guard's scanners by stream mode are worked out once per policy state (stream._layout), not per stream:
    # guards of two engines, made in turns, must each get their own policy's, and the right hold-back.
    for _ in range(2):
        mine, default = StreamGuard(engine, engine.settings), StreamGuard(default_engine, default_engine.settings)
        assert [s.name for s in mine.pattern] == ["BanSubstrings", "Secrets"]
        assert [s.name for s in default.pattern] == ["Secrets"] and default.hold == 0
        assert mine.hold == len(BANNED_OUT) + 1  # BanSubstrings holds back its longest substring's length + 1
        assert run(mine.feed(f"It said {BANNED_OUT} here. ")).violation is not None
        assert run(default.feed(f"It said {BANNED_OUT} here. ")).violation is None


def test_a_scanner_that_stops_being_loaded_is_no_longer_in_new_stream_guards() -> None:
    # The layout cache must follow the policy: a scanner unloaded (failed reload, pruned model) leaves the
    # guards made afterwards, and comes back with them when it is loaded again.
    settings = load_settings(overrides=pure(), environ={})
    eng = ScanEngine(build_policy(settings), settings)
    try:
        assert [s.name for s in StreamGuard(eng, settings).pattern] == ["BanSubstrings", "Secrets"]
        ban = next(s for s in eng.policy.output if s.name == "BanSubstrings")
        instance, ban.instance = ban.instance, None
        assert [s.name for s in StreamGuard(eng, settings).pattern] == ["Secrets"]
        ban.instance = instance
        assert [s.name for s in StreamGuard(eng, settings).pattern] == ["BanSubstrings", "Secrets"]
    finally:
        eng.close()


def test_the_first_word_goes_out_before_the_rest_of_its_read_is_scanned(default_engine) -> None:
    # A fast model's first network read carries dozens of chunks: the first word that passed is written at
    # once, not after every chunk of the read was parsed and scanned; the rest follows in one write.
    import orjson
    from ollama_guard.dialects import ROUTES
    from ollama_guard.relay import GuardedStream

    words = ["Sure", ", ", "here ", "is ", "the ", "answer ", "you ", "asked ", "for. "] * 4
    lines = [
        orjson.dumps({"model": "m", "message": {"role": "assistant", "content": w}, "done": False}) + b"\n"
        for w in words
    ]
    lines.append(orjson.dumps({"model": "m", "message": {"role": "assistant", "content": ""}, "done": True}) + b"\n")

    async def go() -> tuple[list[bytes], list[int]]:
        stream = GuardedStream(
            _Upstream([b"".join(lines)]),
            ROUTES["/api/chat"],
            lambda side: StreamGuard(default_engine, default_engine.settings, side=side),
            "m",
            "stop",
        )
        pieces, seen = [], []
        async for piece in stream.__aiter__():
            pieces.append(piece)
            seen.append(len(stream.seg.guard.text))  # how much of the answer the guard had read by then
        return pieces, seen

    pieces, seen = run(go())
    first = [orjson.loads(x)["message"]["content"] for x in pieces[0].splitlines()]
    assert "".join(first) == "Sure, " and seen[0] < len("".join(words)) // 4
    assert b"".join(pieces) == b"".join(lines)  # nothing rewritten: Ollama's bytes, in order, all of them
    assert len(pieces) <= 3  # the first word, the rest of the read, the end


@pytest.mark.parametrize("size", [1, 3, 7, 40])
def test_settling_without_a_coroutine_releases_what_advance_releases(engine, size: int) -> None:
    # Most chunks bring no scan, and the relay asks StreamGuard.settle (no coroutine) before advance: one guard
    # fed that way and one that always advances must release the same text after every chunk.
    text = f"Sure, the key is {AWS} and then {BANNED_OUT[:5]} more words follow here. " * 3

    async def go() -> tuple[list[int], list[int]]:
        settled, advanced = StreamGuard(engine, engine.settings), StreamGuard(engine, engine.settings)
        a, b = [], []
        for i in range(0, len(text), size):
            settled.append(text[i : i + size])
            upto = settled.settle()
            a.append(upto if upto is not None else (await settled.advance()).release_to)
            b.append((await advanced.feed(text[i : i + size])).release_to)
        return a, b

    a, b = run(go())
    assert a == b and a[-1] > 0


def test_a_first_chunk_without_text_does_not_end_the_hurry_for_the_first_word(default_engine) -> None:
    # An OpenAI-compatible stream may open with a chunk that has a role and no text: it goes out at once, and
    # the first word that passed after it still goes out before the rest of the read is scanned.
    import orjson
    from ollama_guard.dialects import ROUTES
    from ollama_guard.relay import GuardedStream

    def event(delta: dict) -> bytes:
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        return b"data: " + orjson.dumps({**chunk, "choices": [{"index": 0, "delta": delta}]}) + b"\n\n"

    words = ["Sure", ", ", "here ", "is ", "the ", "answer ", "you ", "asked ", "for. "] * 4
    blob = event({"role": "assistant", "content": ""}) + b"".join(event({"content": w}) for w in words)
    blob += b"data: [DONE]\n\n"

    async def go() -> list[bytes]:
        stream = GuardedStream(
            _Upstream([blob]),
            ROUTES["/v1/chat/completions"],
            lambda side: StreamGuard(default_engine, default_engine.settings, side=side),
            "m",
            "stop",
        )
        return [piece async for piece in stream.__aiter__()]

    pieces = run(go())

    def texts(piece: bytes) -> list[str]:
        lines = [x[6:] for x in piece.split(b"\n\n") if x.startswith(b"data: {")]
        return [orjson.loads(x)["choices"][0]["delta"].get("content", "") for x in lines]

    assert texts(pieces[0]) == [""]  # the role chunk, alone
    assert "".join(texts(pieces[1])) == "Sure, "  # then the first word, before the rest of the read
    assert "".join(t for p in pieces for t in texts(p)) == "".join(words) and pieces[-1].endswith(b"[DONE]\n\n")


def test_a_buffer_mode_scanner_holds_the_whole_answer_back_until_it_passed() -> None:
    # `stream: buffer` (docs/STREAMING.md): nothing is released while the answer streams; at its end every output
    # scanner runs once over the whole answer, and only then does any of it go out, rewritten or stopped.
    from .policies import OUTPUT

    output = [dict(OUTPUT[0], stream="buffer"), OUTPUT[1]]
    settings = load_settings(overrides=pure(output_scanners=output), environ={})
    eng = ScanEngine(build_policy(settings), settings)
    try:
        text = "The key is " + AWS + " and it works. " + "More prose follows. " * 20
        guard = StreamGuard(eng, settings)
        assert guard.buffered
        history, step = run(feed_all(guard, text, 4))
        assert step.violation is None and all(h == "" for h in history[:-1])
        assert AWS not in history[-1] and "******" in history[-1] and history[-1].endswith("More prose follows. ")
        assert sorted(r.scanner for r in guard.results) == ["BanSubstrings", "Secrets"]  # one pass, both
        stopped = StreamGuard(eng, settings)
        history, step = run(feed_all(stopped, "Fine words, then " + BANNED_OUT + " and more. " * 30, 4))
        assert step.violation is not None and "BanSubstrings" in step.violation.blocked_by
        assert all(h == "" for h in history)  # nothing went out before the stop
    finally:
        eng.close()
