"""Write docs/CONFIG.md, the reference of every configuration key, from the settings model itself.

python scripts/config_reference.py          # rewrite docs/CONFIG.md
python scripts/config_reference.py --check  # exit 1 when docs/CONFIG.md is out of date (a test runs this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from ollama_guard.settings import ENV_KEYS, LEGACY_KEYS, Settings
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "CONFIG.md"


def _type(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " \\| ".join(repr(a) for a in get_args(annotation))
    text = getattr(annotation, "__name__", None) if not get_args(annotation) else None
    return (text or str(annotation)).replace("typing.", "").replace("ollama_guard.settings.", "").replace("|", "\\|")


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{value!r}`" if value not in ([], {}) else f"`{value}`"
    if field.is_required():
        return "required"
    return f"`{field.default!r}`"


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += rows(ann, key + ".")
            continue
        notes = " ".join((field.description or "").split())  # one table row: a docstring's lines joined
        out.append((key, _type(ann), _default(field), notes.replace("|", "\\|")))
    return out


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `proxy/ollama_guard/settings.py` by `scripts/config_reference.py`; a test fails when it is",
        "out of date. A YAML file (`-c FILE` or `OLLAMA_GUARD_CONFIG`) holds these keys; environment variables",
        "override it; an unknown key stops the process with a message naming it. Any key can also be set as",
        "`OLLAMA_GUARD_<KEY>`, nested with `__` (e.g. `OLLAMA_GUARD_LIMITS__MAX_MESSAGES=50`).",
        "",
        "| key | type | default | notes |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{k}` | `{t}` | {d} | {n} |" for k, t, d, n in rows(Settings)]
    lines += [
        "",
        "Each entry of `input_scanners` / `output_scanners`:",
        "",
        "| key | type | default | notes |",
        "|---|---|---|---|",
    ]
    from ollama_guard.settings import ScannerConfig

    lines += [f"| `{k}` | `{t}` | {d} | {n} |" for k, t, d, n in rows(ScannerConfig)]
    from ollama_guard.settings import ModelRef

    lines += [
        "",
        "A model scanner's `model` (docs/SCAN_ENGINE.md):",
        "",
        "| key | type | default | notes |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{k}` | `{t}` | {d} | {n} |" for k, t, d, n in rows(ModelRef)]
    lines += ["", "## The original proxy's flat keys", "", "| flat key | same as |", "|---|---|"]
    lines += [f"| `{flat}` | `{section}.{key}` |" for flat, (section, key) in LEGACY_KEYS.items()]
    lines += ["", "## Environment variables", "", "| variable | key |", "|---|---|"]
    lines += [f"| `{var}` | `{'.'.join(path)}` |" for var, path in ENV_KEYS.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
