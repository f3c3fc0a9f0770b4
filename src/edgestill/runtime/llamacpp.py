"""llama.cpp, through llama-cpp-python: load a GGUF, its per-position logits, its speed, and llama.cpp's own quantizer.

`LlamaCpp` / `llamacpp_logits` are the reference side of the export parity tests (the exported file, run by
the engine people deploy, against eager transformers) and score GGUFs (evaluate.gguf_eval).
`llamacpp_speed` times prefill and decode (plan.hostbench calibrates the cost model with it).
`llamacpp_quantize` produces the llama.cpp-PTQ baseline (Q8_0, Q4_0, Q4_K_M, Q2_K, ...) from an f32/f16
GGUF, in-process.

llama-cpp-python is optional and imported only here, when called:
    pip install llama-cpp-python==0.3.36   # builds llama.cpp from source (~7 min on 2 cores)
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from edgestill.errors import EdgestillError

INSTALL_HINT = "pip install llama-cpp-python==0.3.36  (builds llama.cpp from source, ~7 minutes on 2 cores)"
# The file types `llamacpp_quantize` accepts by name; llama.cpp knows more (see llama_cpp.LLAMA_FTYPE_*).
QUANT_TYPES = ("F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S",
               "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise EdgestillError(f"llama.cpp runtime not installed: {INSTALL_HINT}") from None
    return llama_cpp


def amx_build() -> bool:
    """Whether this llama.cpp was built with its AMX matmul (-march=native on a CPU with AMX, e.g. Xeon Sapphire Rapids)."""
    return "AMX_INT8 = 1" in _llama_cpp().llama_print_system_info().decode(errors="replace")


def uses_extra_buffer_types() -> bool:
    """Whether `LlamaCpp` / `llamacpp_speed` load models with llama.cpp's extra buffer types (AMX, repacked layouts).

    Not with an AMX build: llama.cpp's AMX matmul segfaults on the first decode (llama.cpp issue #20824; here on
    the tiny Q8_0 parity model, on a Xeon with AMX). Without extra buffer types the same build runs the plain CPU
    kernels: no crash, slower prefill. `make` builds llama.cpp without AMX (-mno-amx-int8), so this is only for a
    llama-cpp-python installed some other way. Timings record it (environment.llamacpp_extra_buffer_types).
    """
    return not amx_build()


def _load(gguf_path, **kwargs):
    """llama_cpp.Llama(gguf_path, **kwargs) with a one-line error, and without extra buffer types on AMX builds."""
    llama_cpp = _llama_cpp()
    low = llama_cpp.llama_cpp  # the module Llama() asks for its model parameters
    default = low.llama_model_default_params

    def without_extra_buffer_types():
        params = default()
        params.use_extra_bufts = False
        return params

    if not uses_extra_buffer_types():
        low.llama_model_default_params = without_extra_buffer_types
    try:
        return llama_cpp.Llama(model_path=str(gguf_path), verbose=False, **kwargs)
    except Exception as e:  # llama.cpp reports load failures (bad metadata, wrong shapes) as ValueError
        raise EdgestillError(f"llama.cpp could not load '{gguf_path}' ({e.__class__.__name__}: {str(e)[:160]})") from None
    finally:
        low.llama_model_default_params = default


class LlamaCpp:
    """One GGUF loaded in llama.cpp, reused for many sequences (load once, then `logits` / `time_tokens`).

    kv_type: the KV-cache precision. "f16" is llama.cpp's default (what a deployment runs); "f32"
    removes that rounding, so an f32 GGUF reproduces transformers' fp32 logits to ~1e-5 relative.
    logits_all: keep every position's logits (for perplexity); False is what generation uses.
    """

    def __init__(self, gguf_path, n_ctx: int = 512, n_threads: int = 2, kv_type: str = "f16", logits_all: bool = True):
        llama_cpp = _llama_cpp()
        kv_types = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}
        if kv_type not in kv_types:
            raise EdgestillError(f"kv_type '{kv_type}' must be one of {', '.join(kv_types)}")
        from edgestill.models.load import check_gguf

        check_gguf(gguf_path)
        self.path, self.n_ctx = Path(gguf_path), max(int(n_ctx), 16)
        self.llm = _load(gguf_path, n_ctx=self.n_ctx, n_batch=self.n_ctx, n_ubatch=self.n_ctx, logits_all=logits_all,
                         n_threads=n_threads, n_threads_batch=n_threads, type_k=kv_types[kv_type], type_v=kv_types[kv_type])

    def logits(self, token_ids) -> np.ndarray:
        """Logits at every position of `token_ids` (no BOS added), from an empty cache: (T, V) float32."""
        token_ids = [int(t) for t in token_ids]
        if not token_ids:
            raise EdgestillError("llama.cpp logits need at least one token")
        if len(token_ids) > self.n_ctx:
            raise EdgestillError(f"{len(token_ids)} tokens do not fit the context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(token_ids)
        return np.array(self.llm.scores[: len(token_ids)], dtype=np.float32)  # copied out of llama's buffer

    def time_tokens(self, prompt_ids, decode_tokens: int) -> tuple[float, float]:
        """(prefill tokens/s, decode tokens/s): the prompt in one batch, then greedy tokens one at a time."""
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval([int(t) for t in prompt_ids])
        t1 = time.perf_counter()
        for _ in range(decode_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            self.llm.eval([token])
        t2 = time.perf_counter()
        return len(prompt_ids) / (t1 - t0), decode_tokens / (t2 - t1)

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def llamacpp_logits(gguf_path, token_ids, n_threads: int = 2, kv_type: str = "f16") -> np.ndarray:
    """Logits at every position of `token_ids` (no BOS added), as llama.cpp computes them: (T, V) float32.

    kv_type: see LlamaCpp ("f16" is llama.cpp's default; "f32" for bit-level comparisons).
    """
    if not len(token_ids):
        raise EdgestillError("llamacpp_logits needs at least one token")
    with LlamaCpp(gguf_path, n_ctx=len(token_ids), n_threads=n_threads, kv_type=kv_type) as model:
        return model.logits(token_ids)


def llamacpp_quantize(src_gguf, dst_gguf, type_name: str, n_threads: int = 2, allow_requantize: bool = False) -> Path:
    """Quantize `src_gguf` (ideally f32/f16) to `dst_gguf` with llama.cpp's quantizer, e.g. type_name="Q4_K_M".

    llama.cpp picks per-tensor types itself (K-quant mixes, fallbacks for rows that do not fit 256-wide
    blocks); that is the point of this baseline. Written atomically (tmp file + rename).
    """
    llama_cpp = _llama_cpp()
    from edgestill.models.load import check_gguf

    check_gguf(src_gguf)
    key = type_name.upper()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{key}", None)
    if ftype is None or key not in QUANT_TYPES:
        raise EdgestillError(f"llama.cpp quantization type '{type_name}' is not one of {', '.join(QUANT_TYPES)}")
    dst = Path(dst_gguf)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    params.allow_requantize = allow_requantize
    import contextlib
    import ctypes

    # llama.cpp logs every tensor to stderr while quantizing; llama-cpp-python's own helper silences it.
    quiet = getattr(getattr(llama_cpp, "_utils", None), "suppress_stdout_stderr", None)
    from edgestill.files import atomic_path

    with atomic_path(dst, f"quantizing to {key} with llama.cpp") as tmp:
        with quiet(disable=False) if quiet is not None else contextlib.nullcontext():
            rc = llama_cpp.llama_model_quantize(str(src_gguf).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise EdgestillError(f"llama.cpp failed to quantize '{src_gguf}' to {key} (return code {rc}); "
                                 "quantize from an f32/f16 GGUF, or pass allow_requantize=True")
    return dst


# --- speed ---------------------------------------------------------------------------------------------

def _rss_bytes(key: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc (Linux); None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _time_once(llm, prompt: list[int], decode_tokens: int) -> tuple[float, float]:
    """(prefill, decode) tokens/s of one timing from an empty cache: the prompt as one batch (logits of the last token
    only, as generation does), then `decode_tokens` single-token steps right after it."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for j in range(decode_tokens):
        llm.eval([prompt[j % len(prompt)]])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), decode_tokens / (t2 - t1)


def llamacpp_speed(gguf_path, prompt_tokens: int = 64, decode_tokens: int = 24,
                   threads: int = 2, repeats: int = 3, warmup: int = 1) -> dict:
    """Prefill and decode tokens/s of a GGUF in llama.cpp (llama-cpp-python), `threads` threads.

    Prefill: the prompt as one batch (logits of the last token only, as generation does). Decode: one
    token per step right after it, KV cache f16 (llama.cpp's default). Medians, with min/max spread.
    On Linux also the growth of peak RSS from before loading (mapped weights + KV cache + buffers).
    """
    n_ctx = prompt_tokens + decode_tokens + 8
    _reset_peak_rss()
    rss_before = _rss_bytes("VmRSS")
    llm = _load(gguf_path, n_ctx=n_ctx, n_batch=prompt_tokens, n_ubatch=prompt_tokens, n_threads=threads,
                n_threads_batch=threads)
    n_vocab = llm.n_vocab()
    prompt = [3 + (i * 7919) % (n_vocab - 3) for i in range(prompt_tokens)]
    prefill, decode = [], []
    try:
        for i in range(warmup + repeats):
            p, d = _time_once(llm, prompt, decode_tokens)
            if i >= warmup:
                prefill.append(p)
                decode.append(d)
        peak_rss = _rss_bytes("VmHWM")
    finally:
        close = getattr(llm, "close", None)
        if close is not None:
            close()
    return {
        "peak_rss_growth_bytes": (peak_rss - rss_before) if peak_rss and rss_before else None,
        "prefill_tokens_per_s": statistics.median(prefill), "prefill_tokens_per_s_spread": [min(prefill), max(prefill)],
        "decode_tokens_per_s": statistics.median(decode), "decode_tokens_per_s_spread": [min(decode), max(decode)],
        "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "threads": threads, "repeats": repeats,
        "prefill_samples": prefill, "decode_samples": decode,
    }


def alternated_speed(gguf_paths: dict, prompt_tokens: int = 64, decode_tokens: int = 32, threads: int = 2,
                     repeats: int = 5, warmup: int = 1) -> dict:
    """Prefill and decode tokens/s of several GGUFs in llama.cpp, alternated inside one run: {name: speeds}.

    Every model is loaded once, then each round times each model in turn (the prompt in one batch, then one token per
    step, as `llamacpp_speed` does), so a change of machine load or clock during the run falls on every model alike
    rather than on whichever was timed then (docs/references.md#measurement-conventions). The first `warmup` rounds
    are not counted. Medians, with min/max spread and every sample.
    """
    if not gguf_paths:
        raise EdgestillError("alternated_speed needs at least one GGUF to time")
    if repeats < 1 or warmup < 0 or prompt_tokens < 1 or decode_tokens < 1:
        raise EdgestillError(f"alternated_speed: repeats ({repeats}), prompt_tokens ({prompt_tokens}) and decode_tokens "
                             f"({decode_tokens}) must be >= 1 and warmup ({warmup}) >= 0")
    n_ctx = prompt_tokens + decode_tokens + 8
    models, samples = {}, {name: ([], []) for name in gguf_paths}
    try:
        for name, path in gguf_paths.items():
            llm = _load(path, n_ctx=n_ctx, n_batch=prompt_tokens, n_ubatch=prompt_tokens, n_threads=threads,
                        n_threads_batch=threads)
            models[name] = (llm, [3 + (i * 7919) % (llm.n_vocab() - 3) for i in range(prompt_tokens)])
        for round_ in range(warmup + repeats):
            for name, (llm, prompt) in models.items():
                p, d = _time_once(llm, prompt, decode_tokens)
                if round_ >= warmup:
                    samples[name][0].append(p)
                    samples[name][1].append(d)
    finally:
        for llm, _ in models.values():
            close = getattr(llm, "close", None)
            if close is not None:
                close()
    return {name: {"file": str(gguf_paths[name]), "file_bytes": Path(gguf_paths[name]).stat().st_size,
                   "prefill_tokens_per_s": statistics.median(pre), "prefill_tokens_per_s_spread": [min(pre), max(pre)],
                   "decode_tokens_per_s": statistics.median(dec), "decode_tokens_per_s_spread": [min(dec), max(dec)],
                   "prefill_samples": pre, "decode_samples": dec}
            for name, (pre, dec) in samples.items()}
