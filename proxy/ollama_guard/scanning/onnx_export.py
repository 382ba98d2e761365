"""ONNX export of a sequence-classification model, and the ONNX Runtime session the batcher runs it in.

``optimum``'s exporter fails on torch 2.13, so the model is exported with torch's TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``, which needs the ``onnx`` package) with dynamic batch and sequence
axes: one file serves every batch size and every padded length. The graph takes ``input_ids`` and
``attention_mask`` only; a single-sequence classification never needs token types other than zero, which is
what the model uses when none are given. The export is checked against torch before it is kept.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..device import cpu_threads

log = logging.getLogger(__name__)

ONNX_SUBDIR = "onnx"
ONNX_FILE = "model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask")


def onnx_path(model_dir: str | os.PathLike[str]) -> Path:
    return Path(model_dir) / ONNX_SUBDIR / ONNX_FILE


def export_onnx(model_dir: str | os.PathLike[str], max_length: int = 512, opset: int = 17) -> Path:
    """Write ``<model_dir>/onnx/model.onnx`` from the HF-format weights in ``model_dir``; return its path."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    target = onnx_path(model_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    model.eval()

    class _Logits(torch.nn.Module):
        def __init__(self, inner: Any):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    def encode(texts: list[str]) -> Any:
        return tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")

    # A sample of two texts of different lengths, padded: the traced graph must not bake in either size.
    sample = encode(["a short sample", "a somewhat longer sample text for tracing the graph"])
    args = (sample["input_ids"], sample["attention_mask"])
    tmp = target.with_suffix(".onnx.tmp")
    with torch.inference_mode():
        # eval() on the wrapper too: the exporter restores the wrapper's mode afterwards, and a fresh Module
        # is in training mode, which would switch dropout on in the model used for the check below.
        torch.onnx.export(
            _Logits(model).eval(),
            args,
            str(tmp),
            input_names=list(INPUT_NAMES),
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"},
            },
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    # Check the export on a shape it was not traced with before replacing a previous one.
    check = encode(["check", "a third text of yet another length, to exercise the dynamic axes of the graph"])
    with torch.inference_mode():
        expected = model(input_ids=check["input_ids"], attention_mask=check["attention_mask"]).logits.numpy()
    session = make_session(tmp, threads=1)
    got = session.run(
        None, {"input_ids": check["input_ids"].numpy(), "attention_mask": check["attention_mask"].numpy()}
    )[0]
    if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-3, rtol=1e-3):
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"ONNX export of {model_dir} does not reproduce the torch model's logits")
    os.replace(tmp, target)
    log.info("exported %s to %s", model_dir, target)
    return target


def onnx_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def make_session(path: str | os.PathLike[str], threads: int | None = None, device: str = "cpu") -> Any:
    """An ONNX Runtime session: intra-op threads = the cores this process may use, inter-op 1.

    One batch runs at a time per model (the batcher's worker), so a single op may use every core; parallel
    ops would only contend with it.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cpu_threads(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
