"""A generated corpus of credentials as people paste them, and of text that only looks like one.

Used by `bench/secrets_corpus.py` (detected/total per kind, false positives) and by the tests. Every token
is random in the shape its issuer documents (prefix, alphabet, length), so no real credential is involved.

- `secret_samples(seed, per_kind)`: `Sample(kind, context, text, values)` for each kind in each context
  (prose, code, JSON, a Markdown table); a sample is detected when none of `values` survives the scan.
- `benign_samples(seed)`: prose and JSON holding git commit hashes, UUIDs, sha256 digests, base64 images,
  colours, versions, URLs: nothing in them may be redacted.

Shapes, from each issuer's documentation or published examples:
- OpenAI: `sk-proj-`, `sk-svcacct-`, `sk-admin-` keys of ~160 URL-safe characters, and older `sk-` + 48
  alphanumerics (platform.openai.com API keys page; the issue's example).
- Anthropic: `sk-ant-api03-` + 93 URL-safe characters + `AA` (console.anthropic.com keys).
- GitHub: classic `ghp_` + 36 alphanumerics; fine-grained `github_pat_` + 22 + `_` + 59
  (github.blog 2021-04-05 and 2022-10-18 token format posts).
- GitLab: `glpat-` + 20 (docs.gitlab.com, "Token prefixes").
- Slack: `xoxb-<digits>-<digits>-<24 alnum>` bot tokens, incoming webhook URLs (api.slack.com/authentication).
- Stripe: `sk_live_` / `rk_live_` + 99 alphanumerics (docs.stripe.com/keys).
- Google: API keys `AIza` + 35; OAuth client secrets `GOCSPX-` + 28.
- Hugging Face: `hf_` + 34 letters. npm: `npm_` + 36. PyPI: `pypi-AgEIcHlwaS5vcmc` + base64url macaroon.
- JWT: base64url JSON header and payload, and a signature. PEM private keys. AWS key pairs: an `AKIA` id
  and its 40-character secret key written next to it.
"""

from __future__ import annotations

import base64
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

ALNUM = string.ascii_letters + string.digits
URLSAFE = ALNUM + "-_"
B64 = ALNUM + "+/"


@dataclass(frozen=True)
class Sample:
    kind: str
    context: str
    text: str
    values: tuple[str, ...]  # what must not survive a scan


def _r(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _b64url(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _jwt(rng: random.Random) -> str:
    header = _b64url({"alg": "HS256", "typ": "JWT"})
    payload = _b64url(
        {"sub": _r(rng, string.digits, 8), "name": "svc", "iat": rng.randrange(1_600_000_000, 1_800_000_000)}
    )
    return f"{header}.{payload}.{_r(rng, URLSAFE, 43)}"


def _pem(rng: random.Random) -> str:
    body = "\n".join(_r(rng, B64, 64) for _ in range(6))
    return f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----"


# kind -> (label used in prose, generator). A generator returns (token as written, values that must go).
GENERATORS: dict[str, tuple[str, Callable[[random.Random], tuple[str, tuple[str, ...]]]]] = {
    "openai-legacy": ("OpenAI API key", lambda r: (t := "sk-" + _r(r, ALNUM, 48), (t,))),
    "openai-project": ("OpenAI key", lambda r: (t := "sk-proj-" + _r(r, URLSAFE, 156), (t,))),
    "openai-service-account": ("OpenAI service key", lambda r: (t := "sk-svcacct-" + _r(r, URLSAFE, 156), (t,))),
    "anthropic": ("Anthropic key", lambda r: (t := "sk-ant-api03-" + _r(r, URLSAFE, 93) + "AA", (t,))),
    "github-classic": ("GitHub token", lambda r: (t := "ghp_" + _r(r, ALNUM, 36), (t,))),
    "github-fine-grained": (
        "GitHub token",
        lambda r: (t := "github_pat_" + _r(r, ALNUM, 22) + "_" + _r(r, ALNUM, 59), (t,)),
    ),
    "gitlab": ("GitLab token", lambda r: (t := "glpat-" + _r(r, URLSAFE, 20), (t,))),
    "slack-bot": (
        "Slack bot token",
        lambda r: (t := f"xoxb-{_r(r, string.digits, 12)}-{_r(r, string.digits, 13)}-{_r(r, ALNUM, 24)}", (t,)),
    ),
    "slack-webhook": (
        "Slack webhook",
        lambda r: (
            t := "https://hooks.slack.com/services/T"
            + _r(r, string.ascii_uppercase + string.digits, 8)
            + "/B"
            + _r(r, string.ascii_uppercase + string.digits, 10)
            + "/"
            + _r(r, ALNUM, 24),
            (t.rsplit("/", 1)[1],),
        ),
    ),
    "stripe-secret": ("Stripe key", lambda r: (t := "sk_live_" + _r(r, ALNUM, 99), (t,))),
    "stripe-restricted": ("Stripe restricted key", lambda r: (t := "rk_live_" + _r(r, ALNUM, 99), (t,))),
    "google-api": ("Google API key", lambda r: (t := "AIza" + _r(r, URLSAFE, 35), (t,))),
    "google-oauth-secret": ("Google client secret", lambda r: (t := "GOCSPX-" + _r(r, URLSAFE, 28), (t,))),
    "huggingface": ("Hugging Face token", lambda r: (t := "hf_" + _r(r, string.ascii_letters, 34), (t,))),
    "npm": ("npm token", lambda r: (t := "npm_" + _r(r, ALNUM, 36), (t,))),
    "pypi": ("PyPI token", lambda r: (t := "pypi-AgEIcHlwaS5vcmc" + _r(r, URLSAFE, 140), (t,))),
    "jwt": ("session token", lambda r: (t := _jwt(r), (t,))),
    "private-key": ("private key", lambda r: (t := _pem(r), tuple(t.splitlines()[1:-1]))),
    "aws-key-pair": (
        "AWS credentials",
        lambda r: (
            f"{(i := 'AKIA' + _r(r, string.ascii_uppercase + string.digits, 16))} / {(s := _r(r, B64, 40))}",
            (i, s),
        ),
    ),
}

CONTEXTS: dict[str, Callable[[str, str], str]] = {
    "prose": lambda label, tok: f"Hi team, my {label} is {tok}. Can someone check why the deploy fails?",
    "code": lambda label, tok: f'import client\n\nconn = client.connect(\n    credential="{tok}",\n    retries=3,\n)\n',
    "json": lambda label, tok: json.dumps({"service": "billing", "env": "prod", "credential": tok}, indent=2),
    "markdown": lambda label, tok: f"| service | {label} |\n|---|---|\n| billing | {tok} |\n",
}


def secret_samples(seed: int = 7, per_kind: int = 5) -> list[Sample]:
    rng = random.Random(seed)  # noqa: S311 - fake tokens for tests, not credentials
    out = []
    for kind, (label, make) in GENERATORS.items():
        for context, wrap in CONTEXTS.items():
            for _ in range(per_kind):
                token, values = make(rng)
                out.append(Sample(kind, context, wrap(label, token), values))
    return out


def _png_b64(rng: random.Random, n: int) -> str:
    # A PNG's first bytes (signature, IHDR) then random data, as an image embedded in Markdown or JSON is.
    head = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00"
    return base64.b64encode(head + rng.randbytes(n)).decode()


def benign_samples(seed: int = 11, per_kind: int = 5) -> list[Sample]:
    """Text with long random-looking strings that are not credentials; `values` holds those strings."""
    rng = random.Random(seed)  # noqa: S311 - fake tokens for tests, not credentials
    hexd = "0123456789abcdef"
    makers: dict[str, Callable[[], tuple[str, tuple[str, ...]]]] = {
        "git-commit": lambda: (
            f"The regression came in with commit {(h := _r(rng, hexd, 40))} and was reverted in {h[:7]}.",
            (h,),
        ),
        "git-commit-json": lambda: (json.dumps({"sha": (h := _r(rng, hexd, 40)), "message": "fix build"}), (h,)),
        "uuid": lambda: (
            f'Request id "{(u := "-".join(_r(rng, hexd, n) for n in (8, 4, 4, 4, 12)))}" failed; retry it.',
            (u,),
        ),
        "sha256-digest": lambda: (
            f'image: "registry.local/app@sha256:{(d := _r(rng, hexd, 64))}"\nchecksum: "{d}"',
            (d,),
        ),
        "base64-image-markdown": lambda: (
            f"Here is the chart: ![chart](data:image/png;base64,{(b := _png_b64(rng, 300))})",
            (b,),
        ),
        "base64-image-json": lambda: (json.dumps({"images": [(b := _png_b64(rng, 300))], "model": "llava"}), (b,)),
        "colours-versions-urls": lambda: (
            "Use #1f2937 on #f9fafb, pin numpy==1.26.4 and see https://docs.python.org/3/library/re.html#re.sub "
            f"or build {(v := 'v' + '.'.join(str(rng.randrange(0, 30)) for _ in range(3)))}.",
            (v,),
        ),
        "prose": lambda: (
            "Kubernetes schedules pods onto nodes; a Deployment keeps the requested number of replicas running "
            "and rolls out new versions gradually, so a bad image can be rolled back.",
            ("Deployment",),
        ),
    }
    return [Sample(kind, "benign", *make()) for kind, make in makers.items() for _ in range(per_kind)]
