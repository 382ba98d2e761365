"""Cross-request batching for text-classification scanners.

llm-guard runs one forward pass per scan. Here every loaded classification model gets one
``BatchedClassifier``: a worker thread that takes the texts of all concurrent callers (up to ``batch_size``
of them, waiting at most ``batch_wait_ms`` for company), tokenizes them in one call, splits long texts into
windows, pads the windows only to the longest one in the pass, runs one forward pass (torch under
``inference_mode`` or an ONNX Runtime session) and hands each caller back its own windows' logits.

The scanner adapters below (PromptInjection, Toxicity, Gibberish) turn those logits into llm-guard's verdicts
with llm-guard's own rules: label names, softmax or sigmoid as its pipeline would apply them, thresholds,
rounding, ``calculate_risk_score``. What differs is what the model sees of a long text (see ``windows``):
llm-guard's pipeline truncates to the first 512 tokens.

Callers are the engine's executor threads (``GuardScanner.call`` -> ``scan(text)``): they block on a future
while the worker runs their batch. ``submit()`` returns that future, for callers that would rather await it.
"""

from __future__ import annotations

import inspect
import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import registry

log = logging.getLogger(__name__)

# Scanner types this module serves, by direction; anything else stays with llm-guard's own classes.
SUPPORTED = {"PromptInjection", "Toxicity", "Gibberish"}
# llm-guard match types whose inputs our windows replace (they only choose what part of a long text is seen).
_WINDOWED_MATCH_TYPES = {
    "PromptInjection": {"full", "truncate_head_tail", "truncate_token_head_tail", "chunks"},
    "Toxicity": {"full"},
    "Gibberish": {"full"},
}
# On a CPU a forward pass may cost at most this much more than its real tokens (see _passes).
CPU_PAD_SLACK = 1.3
_KNOWN_PARAMS = {"threshold", "match_type", "use_onnx"}


# --------------------------------------------------------------------------------------------- windows


def make_windows(ids: list[int], room: int, mode: str) -> list[list[int]]:
    """Split a text's token ids (no special tokens) into windows of at most ``room`` tokens.

    A text that fits is one window whatever the mode, so short prompts cost one row of a batch.
    - ``truncate``: the first ``room`` tokens (what llm-guard's pipeline sees).
    - ``head_tail``: the first and the last ``room`` tokens, two windows: instructions hidden at the end of
      a long prompt are seen, at twice the cost of a short one. The middle of a text longer than two
      windows is not seen.
    - ``chunks``: overlapping windows (1/8 overlap) covering the whole text; cost grows with its length.
    """
    if len(ids) <= room:
        return [ids]
    if mode == "truncate":
        return [ids[:room]]
    if mode == "head_tail":
        return [ids[:room], ids[-room:]]
    overlap = room // 8
    stride = room - overlap
    out = []
    start = 0
    while True:
        out.append(ids[start : start + room])
        if start + room >= len(ids):
            return out
        start += stride


# --------------------------------------------------------------------------------------------- backends


class TorchBackend:
    """Logits from a transformers model on the chosen device (FP16 where the device choice says so)."""

    kind = "torch"

    def __init__(self, model_dir: str, device: str = "cpu", fp16: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification

        self._torch = torch
        dtype = torch.float16 if fp16 and device != "cpu" else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, torch_dtype=dtype)
        self.model.to(device).eval()
        self.device = device
        self.config = self.model.config

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(input_ids).to(self.device),
                attention_mask=torch.from_numpy(attention_mask).to(self.device),
            ).logits
        return out.float().cpu().numpy()


class OnnxBackend:
    """Logits from an ONNX Runtime session over ``<model_dir>/onnx/model.onnx``."""

    kind = "onnx"

    def __init__(
        self,
        model_dir: str,
        device: str = "cpu",
        threads: int | None = None,
        export: bool = True,
        quantize: str = "none",
    ):
        from transformers import AutoConfig

        from .onnx_export import export_onnx, make_session, onnx_path, quantize_int8

        path = onnx_path(model_dir, quantize)
        if not path.is_file():
            if not export:
                raise FileNotFoundError(f"no ONNX model at {path}: run `ollama-guard models pull --onnx`")
            log.info("no ONNX model at %s yet: exporting it now", path)
            if quantize == "int8":
                quantize_int8(model_dir)
            else:
                export_onnx(model_dir)
        if quantize == "int8" and device != "cpu":
            # ONNX Runtime's dynamic quantization is meant for CPUs (its quantization guide points GPUs to
            # static QDQ models): on a GPU provider, nodes without a kernel there fall back to the CPU.
            log.warning("%s: quantize: int8 is a CPU setting; on %s use the float32 model", model_dir, device)
        self.session = make_session(path, threads=threads, device=device)
        self.config = AutoConfig.from_pretrained(model_dir)
        self._inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self._inputs:  # an ONNX file provided from elsewhere (optimum's export)
            feed["token_type_ids"] = np.zeros_like(input_ids)
        return np.asarray(self.session.run(None, feed)[0], dtype=np.float32)


# --------------------------------------------------------------------------------------------- batcher


@dataclass
class BatchStats:
    """Counters, for tests and /health: how the work was actually grouped."""

    batches: int = 0  # batches taken from the queue
    requests: int = 0  # classify() calls served
    texts: int = 0
    passes: int = 0  # forward passes (a batch with many windows may need several)
    windows: int = 0
    max_pass_rows: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)  # texts per batch -> count


class _Request:
    __slots__ = ("texts", "future", "enqueued")

    def __init__(self, texts: list[str]):
        self.texts = texts
        self.future: Future[list[np.ndarray]] = Future()
        self.enqueued = time.monotonic()


_STOP = object()


class BatchedClassifier:
    """One loaded classification model, shared by every scanner and request that uses it."""

    def __init__(
        self,
        backend: Any,
        tokenizer: Any,
        *,
        max_length: int = 512,
        batch_size: int = 16,
        batch_wait_ms: float = 2.0,
        windows: str = "head_tail",
        name: str = "model",
        pad_slack: float | None = None,
    ):
        self.backend = backend
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.wait_s = max(0.0, batch_wait_ms) / 1000.0
        self.windows = windows
        self.name = name
        self.config = backend.config
        model_max = getattr(tokenizer, "model_max_length", None) or max_length
        self.max_length = min(max_length, model_max) if model_max < 1_000_000 else max_length
        self.room = self.max_length - tokenizer.num_special_tokens_to_add(pair=False)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pad_slack = pad_slack
        self.stats = BatchStats()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._carry: _Request | None = None  # worker-only: a request that did not fit the last batch
        self._recent: deque[int] = deque(maxlen=8)  # worker-only: texts in the last batches

    # -- callers

    def submit(self, texts: list[str]) -> Future[list[np.ndarray]]:
        """Queue texts; the future gives one ``(windows, labels)`` logits array per text."""
        req = _Request(list(texts))
        if not req.texts:
            req.future.set_result([])
            return req.future
        self._ensure_worker()
        self._queue.put(req)
        return req.future

    def classify(self, texts: list[str]) -> list[np.ndarray]:
        return self.submit(texts).result()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._thread is not None:
                self._queue.put(_STOP)
                self._thread.join(10)
                self._thread = None

    def _ensure_worker(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._closed:
                raise RuntimeError(f"batched classifier {self.name} is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"batch-{self.name}", daemon=True)
                self._thread.start()

    # -- worker

    def _collect(self, first: _Request) -> tuple[list[_Request], bool]:
        """The first request plus whatever joins it: up to batch_size texts, within the wait bound.

        Whatever is queued already always joins (up to the bound). Beyond that the worker waits for company
        only as long as company is likely: the wait is counted from when the first request was queued (under
        load, requests that queued during the previous pass have waited already), it ends as soon as the batch
        is as large as the largest of the last few batches (about the number of concurrent callers), and a
        caller alone (recent batches of one, nobody queued) does not wait at all: at concurrency 1 the wait
        would be pure added latency.
        """
        batch = [first]
        n = len(first.texts)
        recent = max(self._recent, default=0)
        alone = recent <= 1 and self._queue.empty()
        deadline = first.enqueued + (0.0 if alone else self.wait_s)
        target = min(self.batch_size, recent) if recent > 1 else self.batch_size
        stop = False
        while n < self.batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or n >= target:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is _STOP:
                stop = True
                break
            if n + len(item.texts) > self.batch_size:
                self._carry = item  # over the bound: it leads the next batch
                break
            batch.append(item)
            n += len(item.texts)
        return batch, stop

    def _run(self) -> None:
        while True:
            item, self._carry = self._carry, None
            if item is None:
                item = self._queue.get()
            if item is _STOP:
                return
            batch, stop = self._collect(item)
            try:
                results = self._infer([t for r in batch for t in r.texts])
            except BaseException as exc:  # every caller of this batch gets the error; the worker goes on
                for r in batch:
                    r.future.set_exception(exc)
            else:
                i = 0
                for r in batch:
                    r.future.set_result(results[i : i + len(r.texts)])
                    i += len(r.texts)
                self.stats.batches += 1
                self.stats.requests += len(batch)
                self.stats.texts += i
                self.stats.batch_sizes[i] += 1
                self._recent.append(i)
            if stop:
                return

    def _passes(self, rows: list[list[int]]) -> list[list[int]]:
        """Group rows (longest first) into forward passes of at most batch_size rows.

        With ``pad_slack`` set (CPU), a pass also stops growing when padding would make it cost more than
        ``pad_slack`` times its real tokens: on a CPU padded positions cost as much as real ones, and one
        long prompt in a batch of short ones would otherwise multiply the work. On a GPU (no slack) a pass
        is padded to its longest row, which costs little there.
        """
        order = sorted(range(len(rows)), key=lambda r: len(rows[r]), reverse=True)
        passes: list[list[int]] = []
        i = 0
        while i < len(order):
            width = len(rows[order[i]])
            tokens = 0
            j = i
            while j < len(order) and j - i < self.batch_size:
                length = len(rows[order[j]])
                if j > i and self.pad_slack is not None and (j - i + 1) * width > self.pad_slack * (tokens + length):
                    break
                tokens += length
                j += 1
            passes.append(order[i:j])
            i = j
        return passes

    def _infer(self, texts: list[str]) -> list[np.ndarray]:
        enc = self.tokenizer(
            texts,
            add_special_tokens=False,
            truncation=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )["input_ids"]
        rows: list[list[int]] = []
        owner: list[int] = []
        for t, ids in enumerate(enc):
            for w in make_windows(ids, self.room, self.windows):
                rows.append(self.tokenizer.build_inputs_with_special_tokens(w))
                owner.append(t)
        logits: list[np.ndarray | None] = [None] * len(rows)
        for part in self._passes(rows):
            width = len(rows[part[0]])
            ids_arr = np.full((len(part), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(part), width), dtype=np.int64)
            for j, r in enumerate(part):
                ids_arr[j, : len(rows[r])] = rows[r]
                mask[j, : len(rows[r])] = 1
            out = self.backend(ids_arr, mask)
            for j, r in enumerate(part):
                logits[r] = out[j]
            self.stats.passes += 1
            self.stats.max_pass_rows = max(self.stats.max_pass_rows, len(part))
        self.stats.windows += len(rows)
        per_text: list[list[np.ndarray]] = [[] for _ in texts]
        for r, t in enumerate(owner):
            per_text[t].append(logits[r])  # type: ignore[arg-type]
        return [np.stack(w) for w in per_text]


# --------------------------------------------------------------------------------------------- scoring


def _softmax(x: np.ndarray) -> np.ndarray:
    # As transformers' TextClassificationPipeline computes it.
    maxes = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - maxes)
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def pipeline_function(config: Any, override: str | None) -> str:
    """The function the text-classification pipeline would apply to this model's logits."""
    if override:
        return override
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    if config.problem_type == "single_label_classification" or config.num_labels > 1:
        return "softmax"
    return getattr(config, "function_to_apply", "none")


def _apply(fn: str, logits: np.ndarray) -> np.ndarray:
    if fn == "sigmoid":
        return _sigmoid(logits)
    if fn == "softmax":
        return _softmax(logits)
    return logits


class _BatchedScanner:
    """llm-guard input-scanner semantics: ``scan(text) -> (text, valid, risk_score)``."""

    def __init__(self, clf: BatchedClassifier, stype: Any, threshold: float, function: str):
        util = registry.import_module("llm_guard.util")
        self._risk = util.calculate_risk_score
        self._clf = clf
        self._threshold = threshold
        self._fn = function
        self._labels = [clf.config.id2label[i] for i in range(clf.config.num_labels)]
        self._stype = stype

    @property
    def classifier(self) -> BatchedClassifier:
        return self._clf

    def scan(self, text: str) -> tuple[str, bool, float]:
        if text.strip() == "":
            return text, True, -1.0
        return self.verdict(text, self._clf.classify([text])[0])

    def submit(self, text: str) -> Future[tuple[str, bool, float]]:
        """The verdict as a future, for callers that await instead of blocking a thread."""
        out: Future[tuple[str, bool, float]] = Future()
        if text.strip() == "":
            out.set_result((text, True, -1.0))
            return out

        def done(f: Future[list[np.ndarray]]) -> None:
            try:
                out.set_result(self.verdict(text, f.result()[0]))
            except BaseException as exc:
                out.set_exception(exc)

        self._clf.submit([text]).add_done_callback(done)
        return out

    def verdict(self, text: str, logits: np.ndarray) -> tuple[str, bool, float]:
        raise NotImplementedError


class BatchedPromptInjection(_BatchedScanner):
    """llm_guard PromptInjection.scan, per window: the first window over the threshold blocks."""

    def verdict(self, text: str, logits: np.ndarray) -> tuple[str, bool, float]:
        highest = 0.0
        for probs in _apply(self._fn, logits):
            top = int(probs.argmax())
            p = float(probs[top])
            score = round(p if self._labels[top] == "INJECTION" else 1 - p, 2)
            highest = max(highest, score)
            if score > self._threshold:
                return text, False, self._risk(score, self._threshold)
        return text, True, self._risk(highest, self._threshold)


class BatchedGibberish(_BatchedScanner):
    """llm_guard.input_scanners.Gibberish.scan: the highest window score decides."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._targets = set(registry.import_module("llm_guard.input_scanners.gibberish")._gibberish_labels)

    def verdict(self, text: str, logits: np.ndarray) -> tuple[str, bool, float]:
        highest = 0.0
        for probs in _apply(self._fn, logits):
            top = int(probs.argmax())
            p = float(probs[top])
            score = round(p if self._labels[top] in self._targets else 1 - p, 2)
            highest = max(highest, score)
        if highest > self._threshold:
            return text, False, self._risk(highest, self._threshold)
        return text, True, self._risk(highest, self._threshold)


class BatchedToxicity(_BatchedScanner):
    """llm_guard.input_scanners.Toxicity.scan: any toxic label over the threshold, in any window, blocks."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._toxic = set(registry.import_module("llm_guard.input_scanners.toxicity")._toxic_labels)

    def verdict(self, text: str, logits: np.ndarray) -> tuple[str, bool, float]:
        highest = 0.0
        above = False
        for scores in _apply(self._fn, logits):
            for i, s in enumerate(scores):
                if self._labels[i] not in self._toxic:
                    continue
                s = float(s)
                above = above or s > self._threshold
                highest = max(highest, s)
        return text, not above, self._risk(highest, self._threshold)


_SCANNERS = {
    "PromptInjection": BatchedPromptInjection,
    "Toxicity": BatchedToxicity,
    "Gibberish": BatchedGibberish,
}


class OutputAdapter:
    """llm-guard output-scanner calling convention, ``scan(prompt, output)``, over an input-style scanner."""

    def __init__(self, inner: _BatchedScanner):
        self.inner = inner

    @property
    def classifier(self) -> BatchedClassifier:
        return self.inner.classifier

    def scan(self, prompt: str, output: str) -> tuple[str, bool, float]:
        return self.inner.scan(output)


# --------------------------------------------------------------------------------------------- building

_SHARED: dict[tuple[Any, ...], BatchedClassifier] = {}
_SHARED_LOCK = threading.Lock()


def shared_classifier(
    model_dir: str,
    ref: Any,
    device: Any = None,
    tokenizer_kwargs: dict[str, Any] | None = None,
) -> BatchedClassifier:
    """The process's one BatchedClassifier for these weights and settings (models load once per process)."""
    dev = getattr(device, "torch_device", None) or "cpu"
    fp16 = bool(getattr(device, "fp16", False))
    use_onnx = bool(getattr(ref, "onnx", False))
    if use_onnx:
        from .onnx_export import onnx_available

        if not onnx_available():
            log.warning("onnxruntime is not installed: %s runs on torch (pip install 'ollama-guard[onnx]')", model_dir)
            use_onnx = False
    key = (
        os.path.realpath(model_dir),
        use_onnx,
        ref.quantize if use_onnx else "none",
        dev,
        fp16,
        ref.max_length,
        ref.batch_size,
        ref.batch_wait_ms,
        ref.windows,
    )
    with _SHARED_LOCK:
        clf = _SHARED.get(key)
        if clf is not None:
            return clf
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, **(tokenizer_kwargs or {}))
        backend: Any
        if use_onnx:
            backend = OnnxBackend(
                model_dir, device=dev, threads=getattr(device, "threads", None), quantize=ref.quantize
            )
        else:
            backend = TorchBackend(model_dir, device=dev, fp16=fp16)
        clf = BatchedClassifier(
            backend,
            tokenizer,
            max_length=ref.max_length,
            batch_size=ref.batch_size,
            batch_wait_ms=ref.batch_wait_ms,
            windows=ref.windows,
            name=Path(model_dir).name,
            pad_slack=CPU_PAD_SLACK if dev == "cpu" else None,
        )
        _SHARED[key] = clf
        return clf


def close_shared() -> None:
    """Stop every shared worker (tests; process shutdown)."""
    with _SHARED_LOCK:
        items = list(_SHARED.values())
        _SHARED.clear()
    for clf in items:
        clf.close()


def build_batched(cfg: Any, stype_name: str, direction: str, model_dir: str, ref: Any, device: Any) -> Any | None:
    """A batched scanner for ``cfg``, or None where llm-guard's own class must be used.

    The instance follows llm-guard's calling convention for the direction: ``scan(text)`` for input scanners
    (and input scanners adapted to answers), ``scan(prompt, output)`` for output scanners.
    """
    if stype_name not in SUPPORTED:
        return None
    params = dict(getattr(cfg, "params", None) or {})
    unknown = set(params) - _KNOWN_PARAMS
    if unknown:
        log.info(
            "%s: params %s are not handled by the batched engine; using llm-guard's class",
            stype_name,
            sorted(unknown),
        )
        return None
    match_type = params.get("match_type", "full")
    match_type = getattr(match_type, "value", match_type)
    if match_type not in _WINDOWED_MATCH_TYPES[stype_name]:
        return None  # e.g. "sentence": llm-guard's own splitting
    try:
        stype, adapted = registry.lookup(stype_name, direction)
    except KeyError:
        return None
    if ref is None:
        return None
    cls = registry.scanner_class(stype)
    threshold = params.get("threshold", inspect.signature(cls.__init__).parameters["threshold"].default)
    default = registry.default_model(stype)
    tok_kwargs = dict(default.tokenizer_kwargs) if default is not None else {}
    tok_kwargs.pop("token", None)
    override = default.pipeline_kwargs.get("function_to_apply") if default is not None else None
    clf = shared_classifier(model_dir, ref, device, tok_kwargs)
    inner = _SCANNERS[stype_name](clf, stype, float(threshold), pipeline_function(clf.config, override))
    if direction == "output" and not adapted:
        return OutputAdapter(inner)
    return inner
