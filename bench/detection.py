"""How well a policy detects attacks: a labelled corpus through the configured input scanners.

    .venv/bin/python bench/detection.py [--corpus FILE.jsonl|FILE.csv] [-c CONFIG] [--ollama-url URL]

The corpus: JSONL objects or CSV rows with `prompt`, `label` (attack/benign; also injection/safe,
1/0, true/false) and an optional `category`. The default, `bench/corpus/detection.jsonl`, is a small set the
project wrote itself (instruction overrides, role-play jailbreaks, prompt leaks, indirect injection, hidden
text, obfuscation; and ordinary and tricky benign prompts in several scripts). The policy is the config's
`input_scanners` (default: the built-in policy), whatever each scanner's `action`: a prompt counts as
flagged when any scanner finds it invalid, so a `report`-only rollout is measured the same way it will block.

Prints true/false positive rates, precision, AUC over the highest scanner score where scores vary, the
attacks missed per category and the benign prompts flagged per category. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proxy"))

DEFAULT_CORPUS = Path(__file__).resolve().parent / "corpus" / "detection.jsonl"
ATTACK = {"attack", "injection", "jailbreak", "unsafe", "malicious", "1", "true", "yes"}
BENIGN = {"benign", "safe", "0", "false", "no"}


def read_corpus(path: Path) -> list[tuple[str, bool, str]]:
    """(prompt, is_attack, category) per row. Raises ValueError on a label it cannot read."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for i, row in enumerate(rows, 1):
        label = str(row.get("label", "")).strip().lower()
        if label not in ATTACK | BENIGN:
            raise ValueError(f"{path}:{i}: label {label!r} is neither attack nor benign")
        out.append((str(row["prompt"]), label in ATTACK, str(row.get("category") or "-")))
    return out


def auc(scores: list[tuple[float, bool]]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None when it is undefined."""
    pos = [s for s, y in scores if y]
    neg = [s for s, y in scores if not y]
    if not pos or not neg or len({s for s, _ in scores}) < 2:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


async def measure(corpus: list[tuple[str, bool, str]], settings) -> None:  # noqa: ANN001
    from ollama_guard.scanning.engine import ScanEngine
    from ollama_guard.scanning.policy import build_policy

    policy = build_policy(settings)
    engine = ScanEngine(policy, settings)
    active = [s.name for s in policy.active("input")]
    off = [f"{s.name} ({s.missing})" for s in policy.input if not s.loaded]
    print(f"input scanners: {', '.join(active) or 'none'}")
    if off:
        print(f"not loaded: {'; '.join(off)}")
    try:
        verdicts = [await engine.scan("input", prompt) for prompt, _, _ in corpus]
    finally:
        engine.close()
    tp = fn = fp = tn = 0
    missed: Counter[str] = Counter()
    attacks: Counter[str] = Counter()
    false_pos: Counter[str] = Counter()
    scored: list[tuple[float, bool]] = []
    by_scanner: Counter[str] = Counter()
    for (_, is_attack, category), v in zip(corpus, verdicts, strict=True):
        flagged = any(not r.valid for r in v.results)
        scored.append((max((r.score for r in v.results), default=-1.0), is_attack))
        for r in v.results:
            if not r.valid and is_attack:
                by_scanner[r.scanner] += 1
        if is_attack:
            attacks[category] += 1
            tp += flagged
            fn += not flagged
            missed[category] += not flagged
        else:
            fp += flagged
            tn += not flagged
            false_pos[category] += flagged
    n_att, n_ben = tp + fn, fp + tn
    print(f"corpus: {len(corpus)} prompts, {n_att} attacks, {n_ben} benign")
    print(
        f"TPR {tp}/{n_att} = {tp / n_att if n_att else float('nan'):.3f}   FPR {fp}/{n_ben} = "
        f"{fp / n_ben if n_ben else float('nan'):.3f}   precision {tp / (tp + fp) if tp + fp else float('nan'):.3f}"
    )
    area = auc(scored)
    print(f"AUC (highest scanner score) {area:.3f}" if area is not None else "AUC: scores do not vary (pure scanners)")
    print("attacks caught by scanner: " + (", ".join(f"{k} {v}" for k, v in by_scanner.most_common()) or "none"))
    print("missed attacks per category: " + ", ".join(f"{c} {missed[c]}/{attacks[c]}" for c in sorted(attacks)))
    flagged_benign = {c: n for c, n in false_pos.items() if n}
    print(
        "benign flagged per category: " + (", ".join(f"{c} {n}" for c, n in sorted(flagged_benign.items())) or "none")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("-c", "--config", help="a config file whose input_scanners are measured")
    ap.add_argument("--ollama-url", help="Ollama for OllamaGuard scanners (default: the config's)")
    args = ap.parse_args()
    from ollama_guard.logs import quiet_llm_guard
    from ollama_guard.settings import load_settings

    quiet_llm_guard()
    overrides = {"cache": {"enabled": False}, **({"ollama_url": args.ollama_url} if args.ollama_url else {})}
    settings = load_settings(config_path=args.config, overrides=overrides, environ={})
    corpus = read_corpus(args.corpus)
    asyncio.run(measure(corpus, settings))


if __name__ == "__main__":
    main()
