"""`ollama-guard models pull`: download the configured model scanners' weights into models_path.

Runs where the deployment has internet (a workstation, the operator's optional pull Job). Offline, it stops
with a clear message instead of hanging.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .settings import Settings


def pull_models(settings: Settings, force: bool = False, only: list[str] | None = None, onnx: bool = False) -> int:
    from .scanning import registry
    from .scanning.policy import default_input_scanners, default_output_scanners, resolve_model

    os.environ.pop("HF_HUB_OFFLINE", None)
    os.environ.pop("TRANSFORMERS_OFFLINE", None)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        print("models pull needs huggingface_hub (installed with llm-guard)", file=sys.stderr)
        return 2
    inputs = settings.input_scanners if settings.input_scanners is not None else default_input_scanners()
    outputs = settings.output_scanners if settings.output_scanners is not None else default_output_scanners()
    configs = [("input", c) for c in inputs] + [("output", c) for c in outputs]
    failures = 0
    pulled = 0
    for direction, cfg in configs:
        stype, _ = registry.lookup(cfg.type, direction)
        if stype.default_model is None and cfg.model is None and cfg.type != "Anonymize":
            continue
        if only and cfg.display_name not in only and cfg.type not in only:
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
                allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors", "tokenizer*", "*.py"],
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
    print(f"pulled {pulled} model(s), {failures} failure(s)")
    return 1 if failures else 0
