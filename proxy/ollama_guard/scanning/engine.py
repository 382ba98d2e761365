"""The scan engine: runs a policy's scanners on texts, off the event loop, with a verdict cache.

Per text: pattern (pure-Python) scanners and every sanitizer run as one job on a shared, bounded thread pool
(they hold the GIL, so splitting them buys nothing); each model scanner runs as its own job, concurrently
(torch releases the GIL). Detectors see the original text; sanitizers run in config order, each on the
output of the last. Verdicts are cached per text under the policy's fingerprint.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..settings import Settings
from . import budget
from .policy import GuardScanner, Policy, os_cpu_count

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ScanResult:
    scanner: str
    valid: bool
    score: float
    ms: float
    action: str
    error: str | None = None

    @property
    def fired(self) -> bool:
        return not self.valid or self.error is not None


@dataclass(slots=True)
class Verdict:
    text: str
    blocked: bool
    sanitized: bool
    error: bool
    results: list[ScanResult] = field(default_factory=list)
    cached: bool = False

    @property
    def blocked_by(self) -> list[str]:
        return [r.scanner for r in self.results if r.error or (not r.valid and r.action == "block")]

    @property
    def fired(self) -> list[str]:
        return [r.scanner for r in self.results if r.fired]

    def to_cache(self) -> bytes:
        """The verdict as a cache value (compact JSON, ~100-200 bytes).

        Copied into a right-sized bytes object: the one orjson returns keeps its 4 KiB write buffer
        allocated (measured: 4,089 bytes per ~135-byte value), which made a cached verdict cost ~4.4 kB."""
        encoded = orjson.dumps(
            {
                "b": self.blocked,
                "s": self.sanitized,
                "t": self.text if self.sanitized else None,
                "r": [[r.scanner, r.valid, r.score, r.action] for r in self.results],
            }
        )
        return bytes(memoryview(encoded))

    @classmethod
    def from_cache(cls, raw: bytes, original: str) -> Verdict:
        """The verdict `to_cache` stored, for the text `original`. The decoding of a verdict that kept its
        text is remembered (up to _DECODED_MAX values, a few hundred bytes each): a cache hit's verdict is
        the same few bytes again and again, and decoding them was ~3 us of each lookup."""
        found = _DECODED.get(raw)
        if found is None:
            d = orjson.loads(raw)
            results = tuple(ScanResult(name, valid, score, 0.0, action) for name, valid, score, action in d["r"])
            if d["s"]:  # a sanitized text: not remembered (it may be long)
                return cls(d["t"], d["b"], True, False, list(results), cached=True)
            found = (d["b"], results)
            if len(_DECODED) >= _DECODED_MAX:
                _DECODED.clear()
            _DECODED[raw] = found
        blocked, shared = found
        return cls(original, blocked, False, False, list(shared), cached=True)


# Decoded cache values of verdicts that kept their text: bytes -> (blocked, results). ScanResults are never
# changed once made, so cached verdicts share them.
_DECODED: dict[bytes, tuple[bool, tuple[ScanResult, ...]]] = {}
_DECODED_MAX = 4096


# Pure-Python scanners whose cost is bounded and a few microseconds per character (bench/pattern_cost.py): a
# short text is scanned by them on the event loop, not on a pool thread. Not Regex: a site's own expression
# may backtrack for seconds, and on the event loop nothing else would run meanwhile.
INLINE_TYPES = frozenset(
    {"InvisibleText", "Secrets", "BanSubstrings", "TokenLimit", "JSON", "ReadingTime", "NoRefusalLight"}
)


class GuardUnavailable(Exception):
    """A required scanner is not loaded: guarded traffic is refused."""


def _run_chain(
    chain: list[GuardScanner],
    text: str,
    prompt: str,
    vault: Any,
    short_circuit: bool,
    deadline: float | None = None,
) -> tuple[str, list[ScanResult]]:
    """A plan's `chain` (pattern detectors, then sanitizers): detectors on the original text, then each
    sanitizer on the output of the last. Returns the output text and one result per scanner run, each with its
    run time. Runs in a worker thread or inline, and stops at `deadline` (time.monotonic()): the scanner
    running reports the budget error, the rest do not run. With `short_circuit`, a blocking detector that
    fired ends the chain. A scanner that raises is reported as an error result (the engine blocks or allows
    by config), never raised."""
    previous = budget.enter(deadline)
    try:
        results: list[ScanResult] = []
        current = text  # detectors come first, so they all see the original text
        clock = time.perf_counter
        started = clock()
        for s in chain:
            try:
                out, valid, score = s.call(current, prompt, vault)
                error = None
            except budget.ScanBudgetExceeded:
                valid, score, error = False, 1.0, budget.BUDGET_ERROR
            except Exception as exc:  # reported per scanner; the engine decides block/allow by config
                valid, score, error = False, 1.0, f"{type(exc).__name__}: {exc}"
                log.warning("scanner %s raised %s", s.name, type(exc).__name__)
            now = clock()
            res = ScanResult(s.name, bool(valid), float(score), (now - started) * 1000.0, s.action, error)
            started = now
            results.append(res)
            if error == budget.BUDGET_ERROR:
                return text, results
            if s.action == "sanitize":
                # A sanitizer's output replaces the text whenever it changed it (Deanonymize reports "valid" and
                # still rewrites placeholders).
                if error is None and out != current:
                    current = out
            elif short_circuit and res.fired and s.action == "block":
                return text, results
        return current, results
    finally:
        budget.leave(previous)


@dataclass(slots=True)
class _Plan:
    """How one text is scanned by a set of scanners, worked out once per set: pattern detectors first, then
    the sanitizer chain (`chain`, one job), and each model scanner on its own."""

    pattern: list[GuardScanner]
    sanitizers: list[GuardScanner]
    models: list[GuardScanner]
    chain: list[GuardScanner]  # pattern + sanitizers
    all: list[GuardScanner]
    timeout: float  # seconds: the chain's, or (a plan of one model) the model's
    inline: bool  # every scanner of the chain is a bounded pure one (INLINE_TYPES)
    inline_only: bool  # inline, and no model scanner: the whole plan may run on the event loop
    chain_plan: _Plan | None = None  # with models: the plan of the chain alone, its own job
    # The chain's results, all of them, put in the order of the scanners given (the policy's): positions in
    # the chain's order, or None when the two orders are the same.
    reorder: tuple[int, ...] | None = None

    @classmethod
    def of(cls, scanners: list[GuardScanner]) -> _Plan:
        sanitizers = [s for s in scanners if s.action == "sanitize"]
        pattern = [s for s in scanners if s.action != "sanitize" and not s.is_model]
        models = [s for s in scanners if s.action != "sanitize" and s.is_model]
        chain = pattern + sanitizers
        inline = all(s.cfg.type in INLINE_TYPES for s in chain)
        at = {id(s): i for i, s in enumerate(chain)}  # by identity: two scanners may be configured alike
        positions = tuple(at[id(s)] for s in scanners if id(s) in at)
        reorder = positions if positions != tuple(range(len(chain))) else None
        timeout = sum(s.cfg.timeout for s in chain)
        chain_plan = cls(pattern, sanitizers, [], chain, chain, timeout, inline, inline, None, reorder)
        if not models:
            return chain_plan
        timeout = chain_plan.timeout if chain else sum(s.cfg.timeout for s in models)
        return cls(pattern, sanitizers, models, chain, chain + models, timeout, inline, False, chain_plan)


class _Charge:
    """One scan job's share of its request's scan budget (budget.current_budget): the job may run until
    `deadline` (time.monotonic(); None outside a request), and `done()` charges its run time to the budget."""

    __slots__ = ("budget", "started", "deadline")

    def __init__(self) -> None:
        self.budget = budget.current_budget.get()
        self.started = time.monotonic()
        self.deadline = self.started + self.budget.remaining() if self.budget is not None else None

    @property
    def exhausted(self) -> bool:
        """The request has no budget left: the job must not run."""
        return self.deadline is not None and self.deadline <= self.started

    def done(self) -> None:
        if self.budget is not None:
            self.budget.used += time.monotonic() - self.started


def _over_budget(plan: _Plan, text: str) -> tuple[str, list[ScanResult]]:
    """The results of a job that could not run: its request's scan budget was spent."""
    return text, [ScanResult(s.name, False, 1.0, 0.0, s.action, budget.BUDGET_ERROR) for s in plan.all]


class ScanEngine:
    def __init__(self, policy: Policy, settings: Settings, cache: Any = None, metrics: Any = None):
        self.policy = policy
        self.settings = settings
        self.cache = cache
        self.metrics = metrics
        workers = settings.scan_workers or max(4, os_cpu_count() * 2)
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan")
        self._slots = asyncio.Semaphore(settings.limits.max_concurrent_scans)
        # The pool's threads, shared round-robin by request (budget.FairSlots), a quarter of them at most for one
        # request: pure scanners hold the GIL, so more threads make one request no faster, only the others
        # slower (bench/hostile_bench.py: normal p99 beside a hostile request 91 ms with 2 of 4, 46 ms with 1).
        # Twice as many slots as threads keep a job queued for each thread as it finishes one: handing each
        # slot on through the event loop left threads idle while the loop was busy (-30 % unique prompts/s at
        # c=16). Batched model jobs hold no thread.
        self._threads = budget.FairSlots(2 * workers, per_owner=max(1, workers // 4))
        self._groups = {d: self._split(d) for d in ("input", "output")}
        self._inline_chars = settings.scan_inline_max_chars
        self._order = {s.name: i for i, s in enumerate(policy.all())}  # results are reported in config order
        self._key_bases: dict[tuple[str, str], Any] = {}

    def _split(self, direction: str) -> _Plan:
        return _Plan.of(self.policy.active(direction))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def has_scanners(self, direction: str) -> bool:
        return bool(self.policy.active(direction))

    def cache_key(self, direction: str, text: str, prompt: str = "") -> str:
        """40 hex digits: BLAKE2b-160 of the policy's fingerprint for `direction`, the direction, the prompt
        (output scanners that compare an answer with it) and the text."""
        fingerprint = self.policy.fingerprints[direction]
        base = self._key_bases.get((direction, fingerprint))
        if base is None:  # the hash state of the key's fixed start, copied for each key
            base = hashlib.blake2b(digest_size=20)
            base.update(fingerprint.encode())
            base.update(b"\x00" + direction.encode() + b"\x00")
            self._key_bases[(direction, fingerprint)] = base
        h = base.copy()
        if direction == "output" and self.policy.prompt_dependent():
            h.update(prompt.encode("utf-8", "surrogatepass") + b"\x00")
        h.update(text.encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    async def scan(self, direction: str, text: str, prompt: str = "", vault: Any = None) -> Verdict:
        return (await self.scan_many(direction, [text], prompt, vault))[0]

    async def scan_many(self, direction: str, texts: list[str], prompt: str = "", vault: Any = None) -> list[Verdict]:
        """One verdict per text; cached texts cost a lookup, the rest are scanned concurrently."""
        if self.policy.missing_required():
            raise GuardUnavailable(", ".join(s.name for s in self.policy.missing_required()))
        use_cache = self.cache is not None and self.policy.cacheable(direction)
        verdicts: list[Verdict] = [None] * len(texts)  # type: ignore[list-item]  # each filled below
        keys: list[str] = []
        if use_cache:
            keys = [self.cache_key(direction, t, prompt) for t in texts]
            todo = []
            for i, raw in enumerate(await self.cache.get_many(keys)):
                if raw is None:
                    todo.append(i)
                else:
                    verdicts[i] = Verdict.from_cache(raw, texts[i])
        else:
            todo = list(range(len(texts)))
        if todo:
            groups = self._groups[direction]
            if len(todo) == 1:  # no task for a gather of one
                fresh = [await self._scan_one(groups, texts[todo[0]], prompt, vault)]
            else:
                fresh = await asyncio.gather(*(self._scan_one(groups, texts[i], prompt, vault) for i in todo))
            to_store = []
            for i, v in zip(todo, fresh, strict=True):
                verdicts[i] = v
                if use_cache and not v.error:
                    to_store.append((keys[i], v.to_cache()))
            if to_store:
                await self.cache.set_many(to_store)
            if self.metrics is not None:
                for v in fresh:  # a cached verdict ran no scanner: nothing to observe
                    self.metrics.observe_verdict(direction, v)
        return verdicts

    @staticmethod
    def plan_of(scanners: list[GuardScanner]) -> _Plan:
        """How `scanners` scan a text, worked out once: for a caller that scans with the same set many times
        (`scan_window`'s `plan`)."""
        return _Plan.of(scanners)

    async def scan_window(
        self,
        scanners: list[GuardScanner],
        text: str,
        prompt: str = "",
        vault: Any = None,
        direction: str = "output",
        observe: bool = True,
        plan: _Plan | None = None,
    ) -> Verdict:
        """Scan with a subset of the output scanners, uncached: the streaming guard's windows. `plan`, when
        given, is `plan_of(scanners)`."""
        verdict = await self._scan_one(plan if plan is not None else _Plan.of(scanners), text, prompt, vault)
        if observe and self.metrics is not None:
            self.metrics.observe_verdict(direction, verdict)
        return verdict

    async def _scan_one(self, plan: _Plan, text: str, prompt: str, vault: Any) -> Verdict:
        if self._inline_ok(plan, text):
            # Pure scanners on a short text, on the event loop: nothing to wait for, so no slot is taken.
            out, results = self._inline(plan, text, prompt, vault)
            reorder = plan.reorder
            if reorder is not None and len(results) == len(plan.chain):  # all ran: in the policy's order as planned
                results = [results[i] for i in reorder]
                reorder = None
            return self._combine(text, [(out, results)], ordered=reorder is None)
        async with self._slots:
            jobs = []
            if plan.chain:
                jobs.append(self._pooled(plan.chain_plan or plan, text, prompt, vault))
            run_models = plan.models
            if self.settings.short_circuit and jobs:
                current, results = await jobs.pop()
                if any(r.fired and r.action == "block" for r in results):
                    run_models = []
                first: list[tuple[str, list[ScanResult]]] = [(current, results)]
            else:
                first = []
            for s in run_models:
                if s.stype.remote:
                    jobs.append(self._awaited(s, text, functools.partial(s.instance.ask, text, prompt)))
                    continue
                submit = _submitter(s)
                if submit is not None:
                    # Batched model: await its future; no thread is held while the batch forms and runs.
                    jobs.append(self._awaited(s, text, lambda submit=submit: asyncio.wrap_future(submit(text))))
                    continue
                jobs.append(self._pooled(_Plan.of([s]), text, prompt, vault))
            done = first + ([await jobs[0]] if len(jobs) == 1 else list(await asyncio.gather(*jobs)))
        return self._combine(text, done)

    def _inline_ok(self, plan: _Plan, text: str) -> bool:
        """Scanned right here, on the event loop: bounded pure scanners on a text of at most
        `scan_inline_max_chars` (a hand-off to a pool thread and back costs more than a 300-character
        Secrets scan of ~20-50 us)."""
        return plan.inline_only and len(text) <= self._inline_chars

    def _inline(self, plan: _Plan, text: str, prompt: str, vault: Any) -> tuple[str, list[ScanResult]]:
        charge = _Charge()
        if charge.exhausted:
            return _over_budget(plan, text)
        try:
            return _run_chain(plan.chain, text, prompt, vault, self.settings.short_circuit, charge.deadline)
        finally:
            charge.done()

    def _chain(
        self, plan: _Plan, text: str, prompt: str, vault: Any, deadline: float | None
    ) -> tuple[str, list[ScanResult]]:
        if plan.models:  # a plan of one model scanner (not batched), made for its own job
            return _one_model(plan.models[0], text, prompt, vault)
        return _run_chain(plan.chain, text, prompt, vault, self.settings.short_circuit, deadline)

    async def _pooled(self, plan: _Plan, text: str, prompt: str, vault: Any) -> tuple[str, list[ScanResult]]:
        """The plan's scanners on `text`: inline when `_inline_ok`, else on a pool thread when this request's
        turn comes (FairSlots), within the request's scan budget and the scanners' timeouts."""
        if self._inline_ok(plan, text):
            return self._inline(plan, text, prompt, vault)
        # Outside a request (no budget), each job is its own FairSlots owner.
        async with self._threads.slot(budget.current_budget.get() or object()):
            charge = _Charge()
            if charge.exhausted:
                return _over_budget(plan, text)
            timeout = plan.timeout
            if charge.deadline is not None:
                timeout = min(timeout, charge.deadline - charge.started + 1.0)
            call = functools.partial(self._chain, plan, text, prompt, vault, charge.deadline)
            loop = asyncio.get_running_loop()
            try:
                return await self._bounded(loop.run_in_executor(self.executor, call), timeout, plan.all, text)
            finally:
                charge.done()

    async def _awaited(self, s: GuardScanner, text: str, start: Any) -> tuple[str, list[ScanResult]]:
        """A model scan that holds no thread while it waits: a batched model's future, or a guard model's call
        to Ollama (scanning/guard_models.py). `start()` begins it and returns what to await."""
        started = time.perf_counter()
        error = None
        try:
            _, valid, score = await asyncio.wait_for(start(), s.cfg.timeout)
        except TimeoutError:
            valid, score, error = False, 1.0, "timeout"
        except Exception as exc:  # reported per scanner (an unreadable answer, Ollama down); block/allow by config
            valid, score, error = False, 1.0, f"{type(exc).__name__}: {exc}"
            log.warning("scanner %s raised %s", s.name, type(exc).__name__)
        ms = (time.perf_counter() - started) * 1000.0
        return text, [ScanResult(s.name, bool(valid), float(score), ms, s.action, error)]

    async def _bounded(
        self, fut: Any, timeout: float, scanners: list[GuardScanner], text: str
    ) -> tuple[str, list[ScanResult]]:
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return text, [ScanResult(s.name, False, 1.0, timeout * 1000.0, s.action, "timeout") for s in scanners]

    def _combine(self, text: str, parts: list[tuple[str, list[ScanResult]]], ordered: bool = False) -> Verdict:
        """The verdict of `parts` (a job's output text and results each; the first holds the sanitizer chain's
        output when there are sanitizers), its results in the policy's order (`ordered`: they already are)."""
        new_text = text
        results: list[ScanResult] = []
        for out, res in parts:
            results.extend(res)
            if out != text:
                new_text = out
        fail_closed = self.settings.block_on_guard_error
        errored = blocked = False
        for r in results:  # one pass: this runs for every text scanned
            if r.error is None:
                if not r.valid and r.action == "block":
                    blocked = True
                continue
            errored = True
            # A sanitizer that errored cannot be trusted to have removed what it looks for.
            if fail_closed or r.error == budget.BUDGET_ERROR or r.action == "sanitize":
                blocked = True
        sanitized = new_text != text
        if len(results) > 1 and not ordered:
            order = self._order
            results.sort(key=lambda r: order.get(r.scanner, 0))
        return Verdict(new_text, blocked, sanitized and not blocked, errored, results)


def _submitter(scanner: GuardScanner) -> Any:
    """The future-returning entry of a batched scanner (input style, or wrapped for answers), if it has one."""
    if scanner.stype.vault:
        return None
    inst = scanner.instance
    if scanner.direction == "output" and not scanner.adapted:
        inst = getattr(inst, "inner", None)
    return getattr(inst, "submit", None)


def _one_model(scanner: GuardScanner, text: str, prompt: str, vault: Any) -> tuple[str, list[ScanResult]]:
    """A model scanner that is not batched, on a pool thread (models do not check the budget's deadline: the
    job's timeout, cut to the budget left, bounds them)."""
    return text, _run_chain([scanner], text, prompt, vault, False)[1]
