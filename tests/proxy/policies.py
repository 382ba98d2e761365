"""Pure-scanner policies the HTTP tests run (fast, no model download)."""

BANNED_IN = "FORBIDDENPROMPT"
BANNED_OUT = "FORBIDDENANSWER"
AWS = "AKIAIOSFODNN7EXAMPLE"
GITHUB = "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"

INPUT = [
    {"type": "InvisibleText", "action": "block"},
    {"type": "BanSubstrings", "action": "block", "params": {"substrings": [BANNED_IN], "match_type": "str"}},
    {"type": "Secrets", "action": "sanitize"},
]
OUTPUT = [
    {"type": "BanSubstrings", "action": "block", "params": {"substrings": [BANNED_OUT], "match_type": "str"}},
    {"type": "Secrets", "action": "sanitize"},
]


def pure(**extra):
    return {"input_scanners": INPUT, "output_scanners": OUTPUT, **extra}
