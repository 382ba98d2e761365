"""The Secrets scanner: every secret redacted, including shapes llm-guard's filters let through."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from ollama_guard.scanning import registry

from .policies import AWS, GITHUB

registry._install_package_stubs()
from ollama_guard.scanning.secrets import Secrets  # noqa: E402


@pytest.fixture(scope="module")
def scanner():
    return Secrets()


@pytest.mark.parametrize(
    "text",
    [
        f"config: token = {GITHUB}(prod)",  # llm-guard: filtered as an "indirect reference"
        f"my key is <{GITHUB}>",  # "templated secret"
        f"key ${AWS}",  # "prefixed with dollar sign"
        f"{AWS} # pragma: allowlist secret",  # "allowlisted line"
        f"id: {AWS}",  # "likely id string"
        f"two kinds: {AWS} and {GITHUB}, then {AWS} again",  # llm-guard leaves one behind
    ],
)
def test_secret_is_redacted_whatever_surrounds_it(scanner, text):
    out, valid, score = scanner.scan(text)
    assert not valid and score == 1.0
    assert AWS not in out and GITHUB not in out and "******" in out


def test_plain_prose_passes_untouched(scanner):
    text = "Paris is the capital of France; the Seine runs through it."
    assert scanner.scan(text) == (text, True, -1.0)


def test_concurrent_scans_all_detect(scanner):
    # llm-guard swaps detect-secrets' global settings around each scan, so concurrent scans could run with
    # none; ours configure once. 200 scans on 8 threads: every one finds its secret.
    texts = [f"request {i}: use {AWS} now" for i in range(200)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(scanner.scan, texts))
    assert all(not valid and AWS not in out for out, valid, _ in results)


SAMPLES = [
    AWS,
    GITHUB,
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    "-----BEGIN RSA PRIVATE KEY-----",
    "https://admin:hunter2secret@internal.corp.local/db",
    'api_secret = "8f14e45fceea167a5a36dedd4bea2543c1b0f5d2"',
    "password: 'Zx9$kLm2#Qw8!pR4vN7@'",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "AccountKey=lJzRc1YdHaAA2KCNJJ1tkYwF/+mKK6Ygw0NGe170Xu592euJv2wYUtBlV8z+qnlcNQSnIYVTkLWntUO1F8j8rQ==",
]
PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris: the capital of France = lovely; 'quoted words' here",
    "key = value, id=42, x:y",
    "def f(x):\n    return x * 2\n",
    "\u2028 unusual\u2029separators\r\nand\rreturns",
]


def test_the_line_screen_finds_what_detect_secrets_scan_file_finds(scanner):
    import random

    from ollama_guard.scanning.secrets import could_hold_secret, scan_file_reference, scan_lines

    rng = random.Random(7)
    texts = list(SAMPLES) + list(PROSE)
    for _ in range(150):
        parts = [rng.choice(PROSE) for _ in range(rng.randint(0, 3))]
        if rng.random() < 0.6:
            parts.insert(rng.randint(0, len(parts)), rng.choice(SAMPLES))
        texts.append(rng.choice([" ", "\n", "\t", ""]).join(parts))
    flagged = 0
    for text in texts:
        found = scan_lines(text)
        assert sorted(found) == sorted(scan_file_reference(text)), text
        flagged += bool(found)
        assert could_hold_secret(text) or not found, text
    assert flagged > 50  # the corpus really holds secrets the full scan finds


def test_a_secret_at_the_end_of_a_very_long_line_is_found(scanner):
    text = "word " * 30_000 + AWS  # a 150,000-character line: detect-secrets alone skips lines over 100,000
    out, valid, _ = scanner.scan(text)
    assert not valid and AWS not in out


def _sample(items, rng) -> str:
    """A random string the parsed expression is likely to match (the test keeps only those it does)."""
    from re import _constants as sre

    lookalikes = {"i": "İı", "s": "ſ", "k": "\u212a"}
    out = []
    for op, av in items:
        if op is sre.LITERAL:
            c = chr(av)
            pick = rng.random()
            if pick < 0.2 and c.lower() in lookalikes:
                c = rng.choice(lookalikes[c.lower()])
            elif pick < 0.5:
                c = c.swapcase()
            out.append(c)
        elif op is sre.NOT_LITERAL:
            out.append("a" if av != ord("a") else "b")
        elif op is sre.ANY:
            out.append("x")
        elif op is sre.IN:
            out.append(_class_char(av, rng))
        elif op is sre.BRANCH:
            out.append(_sample(rng.choice(av[1]), rng))
        elif op is sre.SUBPATTERN:
            out.append(_sample(av[3], rng))
        elif op is sre.ATOMIC_GROUP:
            out.append(_sample(av, rng))
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            low, high = av[0], min(av[1], av[0] + 3)
            out.append("".join(_sample(av[2], rng) for _ in range(rng.randint(low, max(low, high)))))
    return "".join(out)


def _class_char(items, rng) -> str:
    from re import _constants as sre

    if items and items[0][0] is sre.NEGATE:
        return rng.choice(" -_=:'\"")
    op, av = rng.choice(items)
    if op is sre.LITERAL:
        return chr(av)
    if op is sre.RANGE:
        return chr(rng.randint(av[0], av[1]))
    if op is sre.CATEGORY:
        return {
            sre.CATEGORY_DIGIT: "7",
            sre.CATEGORY_NOT_DIGIT: "q",
            sre.CATEGORY_SPACE: " ",
            sre.CATEGORY_NOT_SPACE: "q",
            sre.CATEGORY_WORD: "q",
            sre.CATEGORY_NOT_WORD: " ",
        }.get(av, "q")
    return "q"


def test_screen_prefilter_never_skips_a_line_its_expression_matches(scanner):
    """Every screen expression, fed strings generated from its own parse tree (letters in random case and
    re's case-insensitive look-alikes: İ ı ſ K): whenever it matches a line, its literals are in that line."""
    import random
    from re import _parser as sre_parse

    from ollama_guard.scanning import secrets

    rng = random.Random(11)
    assert secrets._screen is not None
    screen = secrets._screen.entries
    assert screen and sum(1 for _, needles, _ in screen if needles) > 150
    exercised = 0
    for pattern, needles, _ in screen:
        tree = sre_parse.parse(pattern.pattern, pattern.flags)
        matched = 0
        for _ in range(60):
            line = rng.choice(["", "x ", "conf: "]) + _sample(tree, rng) + rng.choice(["", " ", "\"'"])
            if pattern.search(line):
                matched += 1
                assert needles is None or any(n in secrets.fold(line) for n in needles), (pattern.pattern, line)
        exercised += matched > 0
    assert exercised > 150  # nearly every expression was really matched, not only sampled


def test_case_insensitive_look_alikes_fold_together():
    import re

    from ollama_guard.scanning.secrets import fold

    for a, b in [("İ", "i"), ("ı", "i"), ("ſ", "s"), ("\u212a", "k"), ("µ", "μ"), ("ς", "σ"), ("ϐ", "β")]:
        assert re.fullmatch("(?i)" + re.escape(b), a)  # re treats them as equal ...
        assert fold(a) == fold(b)  # ... and so does the prefilter's folding


def test_an_ascii_text_folds_as_every_other_text_does():
    """fold() takes lower() alone for ASCII text: the same as the full fold for every ASCII character, and in
    a text beside the characters that do fold."""
    from ollama_guard.scanning import secrets

    ascii_text = "".join(chr(c) for c in range(128))
    assert secrets.fold(ascii_text) == ascii_text.replace("\u0130", "i").lower().translate(secrets._FOLD)
    assert secrets.fold(ascii_text + "ſK") == ascii_text.lower() + "sk"


def test_a_narrower_expression_is_searched_only_where_the_wider_one_matches(scanner):
    """The screen skips Hex- after Base64HighEntropyString's expression missed a line: it is only done for an
    expression whose every match the wider one matches too. Checked on strings generated from the narrower's
    own parse tree, and refused for pairs where a wider class would match less or the classes do not nest."""
    import random
    import re
    from re import _parser as sre_parse

    from ollama_guard.scanning import secrets

    assert secrets._screen is not None
    gates = secrets._screen.wider
    assert {(n.pattern, w.pattern) for n, w in gates.items()} and all("0123456789abcdef" in n.pattern for n in gates)
    rng = random.Random(5)
    for narrow, wide in gates.items():
        tree = sre_parse.parse(narrow.pattern, narrow.flags)
        matched = 0
        for _ in range(300):
            line = rng.choice(["", "x ", "conf: ", "k = "]) + _sample(tree, rng) + rng.choice(["", " tail", "\n"])
            if narrow.search(line):
                matched += 1
                assert wide.search(line), (narrow.pattern, line)
        assert matched > 100
    for narrow, wide in [
        (r"x[a-f]+y", r"x[a-e]+y"),  # the classes do not nest
        (r"x[^a-f]+y", r"x[^a-z]+y"),  # negated: the wider list matches less
        (r"(?!x[a-f])q", r"(?!x[a-z])q"),  # a negative lookahead: a wider class matches less
        (r"x(?>[a-f]+)y", r"x(?>[a-z]+)y"),  # atomic: the wider one may not give back
        (r"x[a-f]+y", r"x[a-f]+z"),  # not alike
        (r"(?i)x[a-f]+", r"x[a-z]+"),  # flags differ
    ]:
        assert not secrets._narrower(re.compile(narrow), re.compile(wide)), (narrow, wide)
    assert secrets._narrower(re.compile(r"(a|b)[0-9]+(c|$)"), re.compile(r"(a|b)[0-9a-z]+(c|$)"))


def test_the_screen_with_its_gates_picks_the_plugins_every_expression_would(scanner):
    """`_plugins_for` (literals and the narrower-expression gate) picks, line by line, the same plugins as
    searching every expression of the screen on the line."""
    import random

    from ollama_guard.scanning import secrets

    rng = random.Random(3)
    hexes = ['k = "' + "".join(rng.choice("0123456789abcdef") for _ in range(40)) + '"' for _ in range(5)]
    lines = list(SAMPLES) + list(PROSE) + hexes + ["id: deadbeefcafe", "x='ABCDEF0123'", "a:b", "'  '"]
    for line in lines:
        line = line.strip()
        every = {id(p) for pattern, _, p in secrets._screen.entries if pattern.search(line)}
        picked = {id(p) for p in secrets._plugins_for(line, secrets._screen_for(line))}
        assert picked == every, line
