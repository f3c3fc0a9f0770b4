"""onnxruntime on CPU: load an ONNX file written by edgestill.export, run it, time it.

    session = onnx_session("runs/a/onnx/model.onnx")                 # checked first, CPU, `threads` threads
    logits = onnx_logits(session, token_ids)                           # a causal LM: (T, V)
    labels = predict_onnx("runs/s/onnx", ["free money!!!", "meeting at 10"])   # an exported classifier folder
    latency = measure_latency({"student": (session, single_inputs(tokenizer, texts, max_len))})

The writers are edgestill.export.onnx (`export_onnx`) and edgestill.export.onnx_classifier
(`export_classifier_onnx`), whose folder layout (model.onnx, tokenizer files, label_map.json,
export_report.json) `load_onnx_classifier` reads.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from edgestill.data.labelled import LabelMap
from edgestill.errors import EdgestillError

__all__ = ["REPORT_FILE", "check_onnx", "onnx_session", "onnx_logits", "onnx_classifier_logits", "load_onnx_classifier",
           "predict_onnx", "single_inputs", "measure_latency"]

REPORT_FILE = "export_report.json"  # written next to model.onnx by the exports; the classifier's holds max_len


# --- loading and running ---------------------------------------------------------------------------------

def check_onnx(path) -> None:
    """Reject a missing, truncated or corrupt ONNX file with a clear message."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise EdgestillError(f"ONNX file not found: '{path}'")
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise EdgestillError(f"'{path}' is not a valid ONNX model (truncated or corrupt?): "
                             f"{e.__class__.__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}; re-export it") from None


def onnx_session(path, threads: int = 2):
    """An onnxruntime CPU session for `path` (checked first), using `threads` intra-op threads."""
    import onnxruntime as ort

    check_onnx(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise EdgestillError(f"onnxruntime could not load '{path}' ({e.__class__.__name__}: {str(e)[:200]})") from None


def onnx_logits(path_or_session, token_ids, threads: int = 2) -> np.ndarray:
    """Logits at every position of `token_ids` (one sequence), as onnxruntime computes them: (T, V) float32."""
    session = onnx_session(path_or_session, threads) if isinstance(path_or_session, (str, Path)) else path_or_session
    ids = np.asarray([int(t) for t in token_ids], dtype=np.int64)[None, :]
    if ids.shape[1] == 0:
        raise EdgestillError("onnx_logits needs at least one token")
    return session.run(["logits"], {"input_ids": ids})[0][0].astype(np.float32)


# --- a classifier folder ---------------------------------------------------------------------

def onnx_classifier_logits(session, enc: dict[str, np.ndarray], batch_size: int = 32) -> np.ndarray:
    """(N, num_labels) logits from onnxruntime over pre-tokenized arrays, each batch cut to its longest row."""
    names = [i.name for i in session.get_inputs()]
    n = len(enc["input_ids"])
    out = []
    for start in range(0, n, batch_size):
        mask = enc["attention_mask"][start : start + batch_size]
        width = max(1, int(mask.sum(1).max()))
        feed = {k: np.ascontiguousarray(enc[k][start : start + batch_size, :width]) for k in names}
        out.append(session.run(["logits"], feed)[0].astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def load_onnx_classifier(folder: str | Path, threads: int = 2):
    """(session, tokenizer, label_map, max_len) of a folder written by `export_classifier_onnx`."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "model.onnx").is_file():
        raise EdgestillError(f"'{folder}' has no model.onnx; export one with `edgestill export --format onnx RUN`")
    label_map = LabelMap.load(folder)
    report = json.loads((folder / REPORT_FILE).read_text()) if (folder / REPORT_FILE).is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    max_len = int(report.get("max_len") or min(tokenizer.model_max_length, 512))
    return onnx_session(folder / "model.onnx", threads), tokenizer, label_map, max_len


def predict_onnx(folder: str | Path, texts: list[str], threads: int = 2, batch_size: int = 32) -> list[str]:
    """Label strings for `texts` from an exported classifier folder (onnxruntime, CPU)."""
    from edgestill.models.encoder import tokenize

    session, tokenizer, label_map, max_len = load_onnx_classifier(folder, threads)
    logits = onnx_classifier_logits(session, tokenize(tokenizer, list(texts), max_len), batch_size)
    if logits.shape[-1] != len(label_map):
        raise EdgestillError(f"'{folder}': the model has {logits.shape[-1]} outputs but label_map.json {len(label_map)} "
                             "labels; re-export it")
    return label_map.decode(logits.argmax(-1))


# --- timing -----------------------------------------------------------------------------------------

def single_inputs(tokenizer, texts: list[str], max_len: int) -> list[dict[str, np.ndarray]]:
    """One (1, len) feed per text, unpadded: what a device classifying one message at a time runs."""
    out = []
    for t in texts:
        enc = tokenizer(t, truncation=True, max_length=max_len, return_tensors="np")
        out.append({"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)})
    return out


def measure_latency(systems: dict[str, tuple[object, list[dict]]], repeats: int = 5, warmup: int = 2) -> dict[str, dict]:
    """Per-example latency (batch 1) of onnxruntime sessions, alternated within each repeat.

    systems: name -> (session, feeds). A repeat runs every feed of one system, then the next system;
    latency = that pass's time / number of feeds. Returns median and [min, max] over repeats, in ms.
    """
    if repeats < 1:
        raise EdgestillError("latency repeats must be at least 1")
    times: dict[str, list[float]] = {name: [] for name in systems}
    first = {name: [session.get_outputs()[0].name] for name, (session, _) in systems.items()}  # logits, rul, ...
    for name, (session, feeds) in systems.items():  # warm-up: allocator, kernel selection
        for feed in feeds[: max(1, warmup)]:
            session.run(first[name], feed)
    for _ in range(repeats):
        for name, (session, feeds) in systems.items():
            t0 = time.perf_counter()
            for feed in feeds:
                session.run(first[name], feed)
            times[name].append((time.perf_counter() - t0) * 1000 / max(1, len(feeds)))
    return {name: {"latency_ms_per_example": statistics.median(v), "latency_ms_spread": [min(v), max(v)],
                   "examples": len(systems[name][1]), "repeats": repeats} for name, v in times.items()}
