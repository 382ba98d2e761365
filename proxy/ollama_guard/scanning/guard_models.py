"""Safety classifiers served by Ollama itself, as scanners (`type: OllamaGuard`).

Sites that run Ollama often cannot fetch Python weights from the Hugging Face hub, but can `ollama pull` a
guard model. The scanner asks one over Ollama's own `/api/chat` (non-streamed, temperature 0) and reads
its answer by the family's format. Ollama applies the model's chat template, which builds the family's
classification prompt from the messages:

- `llama-guard` (Llama Guard 3: `llama-guard3:1b`, `:8b`): the user turn, plus the assistant turn for an
  answer. It answers `safe`, or `unsafe` and a line of category codes (`S1,S10`). The categories, from the
  Llama Guard 3 model card (MLCommons hazard taxonomy): S1 violent crimes, S2 non-violent crimes, S3
  sex-related crimes, S4 child sexual exploitation, S5 defamation, S6 specialized advice, S7 privacy,
  S8 intellectual property, S9 indiscriminate weapons, S10 hate, S11 suicide and self-harm, S12 sexual
  content, S13 elections, S14 code interpreter abuse. `categories` lists the codes that block (default: all).
- `shieldgemma` (ShieldGemma): answers `Yes` (the text violates the policy in its template) or `No`.
- `granite-guardian` (`granite3-guardian`): the system message names the risk to check (`risk`: `harm`,
  `jailbreak`, `social_bias`, `violence`, `profanity`, `unethical_behavior`, `sexual_content`,
  `function_call` ...; IBM Granite Guardian 3 model card); answers `Yes` (the risk is present) or `No`.

An answer in no such form raises GuardModelError: the engine then blocks or not by `block_on_guard_error`,
like any scanner error, and so does a timeout or an Ollama error. The calls go straight to Ollama (the
proxy's upstream URL unless `ollama_url` says otherwise): never through the proxy's guarded routes, never
rate-limited. At most `max_concurrent` calls at once per scanner.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp
import orjson

FAMILIES = ("llama-guard", "shieldgemma", "granite-guardian")
LLAMA_GUARD_CATEGORIES = tuple(f"S{i}" for i in range(1, 15))
_CODES = re.compile(r"^S\d{1,2}$")


class GuardModelError(Exception):
    """The guard model could not give a verdict (unreadable answer, Ollama error, model missing)."""


def parse_answer(family: str, answer: str, blocking: frozenset[str]) -> tuple[bool, list[str]]:
    """(flagged, categories) from a guard model's answer. Raises GuardModelError on anything else."""
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    if not lines:
        raise GuardModelError("the guard model gave an empty answer")
    first = lines[0].lower().rstrip(".")
    if family == "llama-guard":
        if first == "safe" and len(lines) == 1:
            return False, []
        if first == "unsafe" and len(lines) == 2:
            codes = [c.strip().upper() for c in lines[1].split(",")]
            if codes and all(_CODES.match(c) for c in codes):
                return any(c in blocking for c in codes), codes
        raise GuardModelError(f"not a Llama Guard answer: {answer[:40]!r}")
    if first in ("yes", "no") and len(lines) == 1:
        return first == "yes", []
    raise GuardModelError(f"not a Yes/No answer: {answer[:40]!r}")


class OllamaGuard:
    """One guard model on one Ollama, for prompts (`direction: input`) or answers (`output`)."""

    def __init__(
        self,
        model: str,
        family: str,
        *,
        ollama_url: str,
        direction: str = "input",
        categories: list[str] | None = None,
        risk: str = "jailbreak",
        timeout: float = 30.0,
        max_concurrent: int = 4,
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
        self.model = model
        self.family = family
        self.url = ollama_url.rstrip("/")
        self.direction = direction
        self.blocking = frozenset(c.upper() for c in (categories or LLAMA_GUARD_CATEGORIES))
        self.risk = risk
        self.timeout = timeout
        self.max_concurrent = max(1, max_concurrent)
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def messages(self, text: str, prompt: str = "") -> list[dict[str, str]]:
        """The conversation the guard model judges: the prompt, or the prompt and the answer."""
        turns = [{"role": "user", "content": text}]
        if self.direction == "output":
            turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        if self.family == "granite-guardian":
            turns.insert(0, {"role": "system", "content": self.risk})
        return turns

    def _bound(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            # No cookie jar: one session asks for every request (see upstream.Upstream.start).
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout), cookie_jar=aiohttp.DummyCookieJar()
            )
            self._slots = asyncio.Semaphore(self.max_concurrent)
            self._loop = loop
        assert self._slots is not None
        return self._session, self._slots

    async def ask(self, text: str, prompt: str = "") -> tuple[str, bool, float]:
        """llm-guard's (text, valid, score) for `text`: valid False when the guard model flags it (score 1.0).
        Raises GuardModelError or a timeout."""
        session, slots = self._bound()
        body = {
            "model": self.model,
            "messages": self.messages(text, prompt),
            "stream": False,
            "options": {"temperature": 0, "num_predict": 32},
        }
        async with slots, session.post(self.url + "/api/chat", data=orjson.dumps(body)) as resp:
            raw = await resp.read()
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise GuardModelError(f"Ollama answered {resp.status} with no JSON") from None
        if resp.status != 200 or not isinstance(obj, dict):
            error = obj.get("error") if isinstance(obj, dict) else None
            raise GuardModelError(f"Ollama answered {resp.status}: {str(error)[:200]}")
        answer = (obj.get("message") or {}).get("content")
        if not isinstance(answer, str):
            raise GuardModelError("Ollama's answer has no message content")
        flagged, _ = parse_answer(self.family, answer, self.blocking)
        return text, not flagged, 1.0 if flagged else 0.0

    async def present(self) -> str | None:
        """None if Ollama has the model (`/api/show`), else why not (for /health and /ready)."""
        session, _ = self._bound()
        try:
            async with session.post(self.url + "/api/show", data=orjson.dumps({"model": self.model})) as resp:
                if resp.status == 200:
                    return None
                return f"Ollama has no model {self.model!r} (HTTP {resp.status}): ollama pull {self.model}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"Ollama at {self.url} did not answer: {type(exc).__name__}"

    def scan(self, prompt: str, output: str | None = None) -> tuple[str, bool, float]:
        """llm-guard's synchronous signature, for callers outside an event loop (`config check`, tests)."""
        text, context = (prompt, "") if output is None else (output, prompt)

        async def once() -> tuple[str, bool, float]:
            try:
                return await self.ask(text, context)
            finally:
                await self.close()

        return asyncio.run(once())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
