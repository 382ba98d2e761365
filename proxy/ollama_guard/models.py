"""`ollama-guard models pull`: download the configured model scanners' weights into models_path.

Runs where the deployment has internet (a workstation, the operator's optional pull Job). Offline, it stops
with a clear message instead of hanging.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .settings import Settings

# The files a scanner model needs: config and tokenizer files (BERT's vocab.txt, RoBERTa's vocab.json and
# merges.txt, DeBERTa-v3's SentencePiece spm.model, tokenizer.json) and the weights; no other framework's.
PULL_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "tokenizer*", "*.py"]


def pull_models(settings: Settings, force: bool = False, only: list[str] | None = None, onnx: bool = False) -> int:
    from .scanning import registry
    from .scanning.policy import default_input_scanners, default_output_scanners, resolve_model

    inputs = settings.input_scanners if settings.input_scanners is not None else default_input_scanners()
    outputs = settings.output_scanners if settings.output_scanners is not None else default_output_scanners()
    configs = [("input", c) for c in inputs] + [("output", c) for c in outputs]
    remote = [registry.lookup(c.type, d)[0].remote for d, c in configs]

    def chosen(cfg: Any) -> bool:
        return not only or cfg.display_name in only or cfg.type in only

    # Guard models served by Ollama: Ollama pulls them. With nothing else configured, the hub is not needed.
    pulls = [(d, c) for (d, c), r in zip(configs, remote, strict=True) if r and chosen(c)]
    guard_failures = sum(not pull_guard_model(settings, d, c) for d, c in pulls)
    if pulls and all(remote):
        return 1 if guard_failures else 0
    os.environ.pop("HF_HUB_OFFLINE", None)
    os.environ.pop("TRANSFORMERS_OFFLINE", None)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        print("models pull needs huggingface_hub (installed with llm-guard)", file=sys.stderr)
        return 2
    failures = guard_failures
    pulled = len(pulls) - guard_failures  # the guard models Ollama pulled count too
    for direction, cfg in configs:
        stype, _ = registry.lookup(cfg.type, direction)
        if stype.remote or (stype.default_model is None and cfg.model is None and cfg.type != "Anonymize"):
            continue
        if not chosen(cfg):
            continue
        local, ref = resolve_model(cfg, stype, settings.model_copy(update={"use_local_models": True}))
        repo = ref.hf_repo
        if not repo:
            print(f"{direction}/{cfg.display_name}: no hf_repo configured; mount the weights at {local}")
            continue
        if (Path(local) / "config.json").is_file() and not force:
            print(f"{direction}/{cfg.display_name}: already present in {local}")
            continue
        print(f"{direction}/{cfg.display_name}: downloading {repo} -> {local}")
        try:
            snapshot_download(
                repo_id=repo,
                revision=ref.revision,
                local_dir=local,
                allow_patterns=PULL_PATTERNS,
            )
        except (LocalEntryNotFoundError, OSError) as exc:
            failures += 1
            print(
                f"  failed: cannot reach the Hugging Face hub ({type(exc).__name__}). Are you offline? "
                f"Copy the weights of {repo} into {local} instead.",
                file=sys.stderr,
            )
            continue
        except Exception as exc:
            failures += 1
            print(f"  failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        pulled += 1
        if onnx or (ref.onnx):
            from .scanning.onnx_export import export_onnx

            export_onnx(local, max_length=ref.max_length)
            print(f"  exported ONNX to {local}/onnx/model.onnx")
            if ref.quantize == "int8":
                from .scanning.onnx_export import quantize_int8

                print(f"  quantized to {quantize_int8(local)}")
    print(f"pulled {pulled} model(s), {failures} failure(s)")
    return 1 if failures else 0


def pull_guard_model(settings: Settings, direction: str, cfg: Any) -> bool:
    """Have Ollama pull a guard-model scanner's model (`POST /api/pull`, streamed), printing its progress.
    True when Ollama reports success."""
    import json
    import urllib.error
    import urllib.request

    model = cfg.params.get("model")
    url = str(cfg.params.get("ollama_url") or settings.ollama_url).rstrip("/")
    print(f"{direction}/{cfg.display_name}: ollama pull {model} on {url}")
    if not url.startswith(("http://", "https://")):
        print(f"  failed: {url} is not an http(s) URL", file=sys.stderr)
        return False
    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
        url + "/api/pull",
        data=json.dumps({"model": model, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    last = ""
    try:
        with urllib.request.urlopen(request, timeout=600) as resp:  # noqa: S310 - the configured Ollama URL
            for raw in resp:
                if not raw.strip():
                    continue
                event = json.loads(raw)
                if "error" in event:
                    print(f"  failed: {event['error']}", file=sys.stderr)
                    return False
                status = str(event.get("status", ""))
                total, done = event.get("total"), event.get("completed")
                line = f"  {status}" + (f" {100 * done // total}%" if total and done is not None else "")
                if line != last:
                    print(line, flush=True)
                    last = line
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"  failed: Ollama at {url} did not answer ({type(exc).__name__})", file=sys.stderr)
        return False
    if last.strip() != "success":
        print("  failed: Ollama did not report success", file=sys.stderr)
        return False
    return True
