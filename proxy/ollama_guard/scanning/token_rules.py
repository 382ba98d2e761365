"""Credentials that identify themselves by prefix and shape, wherever they stand in a text.

A detect-secrets plugin (loaded by path, like llm-guard's own plugins, so this file imports nothing from
the package). llm-guard 0.3.16's rule set (derived from gitleaks) misses these when they are written in
prose, as people paste them ("my key is sk-..."): its OpenAI rule needs the `T3BlbkFJ` marker that project
and service-account keys do not carry; its Hugging Face rule needs a quote or `=` around the token and no
full stop after it; npm, Google and AWS secret keys need an assignment or quotes around them. No maintained
rule set newer than llm-guard's is published on PyPI (gitleaks ships only as a Go binary; trufflehog3's and
whispers' rules predate these formats), so the shapes are written here, each from its issuer's documentation:

- OpenAI: `sk-proj-`, `sk-svcacct-`, `sk-admin-`, `sk-None-` + URL-safe characters, and `sk-` + 32 or more
  alphanumerics (platform.openai.com/api-keys).
- Anthropic: `sk-ant-api03-`, `sk-ant-admin01-` ... (docs.anthropic.com, "API keys").
- Google: API keys `AIza` + 35 (cloud.google.com/docs/authentication/api-keys), OAuth client secrets
  `GOCSPX-` + 28.
- Hugging Face `hf_` + 34 letters (huggingface.co/docs/hub/security-tokens); npm `npm_` + 36
  (docs.npmjs.com, "About access tokens"); GitLab's token prefixes (docs.gitlab.com, "Token overview");
  Groq `gsk_`, xAI `xai-`, Replicate `r8_`, Perplexity `pplx-` (their API references).
- AWS: an access key id (`AKIA`/`ASIA` + 16) followed on the same line, within 100 characters, by a
  40-character secret access key: the secret is reported (the id alone is llm-guard's AWSKeyDetector's).

Each expression reports the token (its first group where it has one). Tokens are delimited by characters
that cannot belong to them, so a full stop, comma, quote, bracket or table bar after a token does not hide it.
"""

from __future__ import annotations

import re

from detect_secrets.plugins.base import RegexBasedDetector

_B = r"(?<![A-Za-z0-9_\-])"  # not preceded by a token character
_E = r"(?![A-Za-z0-9_\-])"  # not followed by one

RULES: tuple[str, ...] = (
    rf"{_B}(sk-(?:proj|svcacct|admin|None)-[A-Za-z0-9_\-]{{20,}}){_E}",
    rf"{_B}(sk-[A-Za-z0-9]{{32,}}){_E}",
    rf"{_B}(sk-ant-[a-z]+\d\d-[A-Za-z0-9_\-]{{20,}}){_E}",
    rf"{_B}(AIza[0-9A-Za-z_\-]{{35}}){_E}",
    rf"{_B}(GOCSPX-[A-Za-z0-9_\-]{{28}}){_E}",
    rf"{_B}(hf_[A-Za-z]{{34}}){_E}",
    rf"{_B}(npm_[A-Za-z0-9]{{36}}){_E}",
    rf"{_B}((?:glpat|glptt|gldt|glrt|glsoat|glcbt|glimt|gloas|glft|glffct|glagent)-[A-Za-z0-9_\-]{{20,}}){_E}",
    rf"{_B}(GR1348941[A-Za-z0-9_\-]{{20}}){_E}",
    rf"{_B}(gsk_[A-Za-z0-9]{{52}}){_E}",
    rf"{_B}(xai-[A-Za-z0-9]{{60,}}){_E}",
    rf"{_B}(r8_[A-Za-z0-9]{{37}}){_E}",
    rf"{_B}(pplx-[A-Za-z0-9]{{48}}){_E}",
    r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])[^\n]{0,100}?(?<![A-Za-z0-9/+])([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])",
)


class PrefixedTokenDetector(RegexBasedDetector):
    """Self-identifying credentials anywhere in a line (see the module docstring for the sources)."""

    secret_type = "Prefixed Token"  # noqa: S105 - the finding type detect-secrets reports
    denylist = [re.compile(rule) for rule in RULES]
