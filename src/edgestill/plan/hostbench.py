"""The `host` device profile: this machine, measured by a short micro-benchmark and cached.

Two parts, both cached under `$EDGESTILL_CACHE/plan/` (default ~/.cache/edgestill/plan/):

1. `measure_host(threads)` (about a second): sustained read bandwidth (a multi-threaded sum over a
   128 MiB buffer, 4x a typical L3) and f32/bf16 matmul throughput (torch.mm, 1024^2), with `threads`.
2. `calibrate_llamacpp(threads)` (under a minute on an idle 2-core host, once; needs llama-cpp-python):
   llama.cpp's own per-format throughput, fitted on *synthetic* random-weight Llama models (written
   directly as GGUF, no quantizer) whose shapes are chosen apart from any student the cost model is
   later validated on:
       wide   hidden 1024, FFN 2560, 16 heads / 4 KV, 4 layers, vocab 24576 (67M weights)
       narrow hidden 512,  FFN 1024,  8 heads / 2 KV, 16 layers, vocab 40960 (57M weights)
       deep   hidden 384,  FFN 1024,  6 heads / 2 KV, 32 layers, vocab 16384 (57M weights)
       tiny   hidden 64, FFN 128, vocab 512, with 2 and with 18 layers
   The three rate shapes are 30-130 MB in every format, larger than a last-level cache, like real students.
   Decode is timed one token at a time after a 64-token prompt, prefill as one batch, each the median
   of a few repeats (`edgestill.runtime.llamacpp.llamacpp_speed`), and `fit_llamacpp` solves the cost model's own equations for:
       token_overhead_s, layer_overhead_s      <- decode step time of the two tiny models (a line in L)
       decode_weights_per_s[fmt],              <- wide, narrow and deep decode steps, minus overheads:
         decode_row_overhead_s[fmt],              t = weights / rate + output rows * row overhead
         decode_op_overhead_s[fmt]                    + matmuls * op overhead (non-negative least squares)
       prefill_*[fmt]                          <- the three shapes' prefill, the same form (rows x tokens)
   These are the only calibration constants of the host profile; the validation in
   benchmarks/cost_model.py runs students sliced from the real teacher, none of these shapes.

`host_profile()` turns both into a DeviceProfile named `host` (figures of kind `measured`/`fit`,
source: this module). The cache key holds the thread count and the llama-cpp-python version;
pass refresh=True to measure again (the machine is shared: figures drift with load).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from edgestill.errors import EdgestillError
from edgestill.plan.devices import DeviceProfile, Figure, RuntimeProfile
from edgestill.quant.formats import format_names, format_spec
from edgestill.runtime.llamacpp import llamacpp_speed

SOURCE = "edgestill.plan.hostbench"
CALIBRATION_FORMATS = format_names(hostbench=True)  # the format registry's: f16, q8_0, q5_1, ... q4_k
# Synthetic calibration shapes (never a validation shape; see the module docstring).
WIDE_SHAPE = dict(hidden=1024, intermediate=2560, heads=16, kv_heads=4, layers=4, vocab=24576)
NARROW_SHAPE = dict(hidden=512, intermediate=1024, heads=8, kv_heads=2, layers=16, vocab=40960)
DEEP_SHAPE = dict(hidden=384, intermediate=1024, heads=6, kv_heads=2, layers=32, vocab=16384)
RATE_SHAPES = {"wide": WIDE_SHAPE, "narrow": NARROW_SHAPE, "deep": DEEP_SHAPE}
TINY_SHAPE = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512)
TINY_LAYERS = (2, 18)
PROMPT_TOKENS, DECODE_TOKENS = 64, 24


def plan_cache_dir(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from edgestill.models.load import cache_dir as edgestill_cache

    return edgestill_cache() / "plan"


# --- bandwidth and matmul ------------------------------------------------------------------------------

def _best_of(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def measure_host(threads: int = 2, buffer_mib: int = 128, repeats: int = 7) -> dict:
    """Read bandwidth (bytes/s) and matmul FLOP/s (f32, bf16) with `threads` threads; about a second.

    Medians are reported as the figures (the machine is shared); best and worst go along as spread.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(buffer_mib * 2**20 // 4)  # float32, touched once here
        x.sum()
        _, times = _best_of(lambda x=x: x.sum(), repeats)
        bandwidth = [x.numel() * 4 / t for t in times]
        del x
        result = {"threads": threads, "memory_bandwidth_bytes_per_s": statistics.median(bandwidth),
                  "memory_bandwidth_spread": [min(bandwidth), max(bandwidth)], "buffer_mib": buffer_mib,
                  "ram_available_bytes": available_ram_bytes()}
        n = 1024
        for dtype in ("float32", "bfloat16"):
            a = torch.randn(n, n).to(getattr(torch, dtype))
            b = torch.randn(n, n).to(getattr(torch, dtype))
            a @ b
            _, times = _best_of(lambda: a @ b, repeats)
            flops = [2 * n**3 / t for t in times]
            key = {"float32": "f32", "bfloat16": "bf16"}[dtype]
            result[f"matmul_flops_per_s_{key}"] = statistics.median(flops)
            result[f"matmul_flops_per_s_{key}_spread"] = [min(flops), max(flops)]
    finally:
        torch.set_num_threads(previous)
    return result


# --- synthetic models for the llama.cpp fit ------------------------------------------------------------

def write_synthetic_gguf(path, shape, fmt: str, seed: int = 0) -> Path:
    """A llama.cpp GGUF of `shape` (a cost.StudentShape, tied head) with random weights in `fmt`, for timing.

    No torch, no quantizer: block bytes are random codes whose fp16 scales are set to a small value
    (so activations stay finite), which is all llama.cpp's kernels look at. A few hundred ms for 100M
    weights. The vocabulary is placeholder tokens `t0`, `t1`, ... with one BPE merge.
    """
    import gguf
    import numpy as np

    from edgestill.plan.cost import tensor_costs

    if shape.tied is not True:
        raise EdgestillError("write_synthetic_gguf writes tied-head models only")
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[fmt.upper()]
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    try:
        writer.add_type("model")
        writer.add_name("edgestill-synthetic")
        writer.add_block_count(shape.layers)
        writer.add_context_length(2048)
        writer.add_embedding_length(shape.hidden)
        writer.add_feed_forward_length(shape.intermediate)
        writer.add_head_count(shape.heads)
        writer.add_head_count_kv(shape.kv_heads)
        writer.add_key_length(shape.dim_per_head)
        writer.add_value_length(shape.dim_per_head)
        writer.add_rope_dimension_count(shape.dim_per_head)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(shape.vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list([f"t{i}" for i in range(shape.vocab)])
        writer.add_token_types([1] * shape.vocab)
        writer.add_token_merges(["t 0"])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        scale = np.frombuffer(np.float16(1e-3).tobytes(), dtype=np.uint8)
        for cost in tensor_costs(shape, {}, fmt):
            if len(cost.shape) == 1:
                writer.add_tensor(cost.gguf_name, np.ones(cost.shape, dtype=np.float32))
                continue
            stored = gguf.GGMLQuantizationType[cost.fmt.upper()]
            rows, cols = cost.shape
            if stored == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(cost.gguf_name, (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02)
                                  .astype(np.float16))
                continue
            block, type_size = gguf.GGML_QUANT_SIZES[stored]
            data = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
            spec = format_spec(cost.fmt)
            for k in range(spec.scale_fields):  # the fp16 scale (and min) of each block
                data[..., spec.scale_offset + 2 * k:spec.scale_offset + 2 * k + 2] = scale
            writer.add_tensor(cost.gguf_name, data.reshape(rows, -1), raw_dtype=stored)
        if qtype not in (gguf.GGMLQuantizationType.F16,):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def calibrate_llamacpp(threads: int = 2, formats=CALIBRATION_FORMATS, repeats: int = 3,
                       bandwidth: float = float("inf")) -> dict:
    """Time llama.cpp on the synthetic shapes (see module doc) and fit its overheads and per-format rates."""
    from edgestill.plan.cost import StudentShape

    raw: dict = {}
    with tempfile.TemporaryDirectory(prefix="edgestill-hostbench-") as tmp:
        for layers in TINY_LAYERS:  # overheads: decode steps of two tiny models differ by 16 layers
            path = write_synthetic_gguf(Path(tmp) / f"tiny{layers}.gguf", StudentShape(layers=layers, **TINY_SHAPE), "q8_0")
            raw[f"tiny{layers}"] = llamacpp_speed(path, PROMPT_TOKENS, DECODE_TOKENS, threads=threads, repeats=repeats)
        for fmt in formats:  # per-format rates: two shapes separate the per-weight and per-row costs
            for name, shape in RATE_SHAPES.items():
                path = write_synthetic_gguf(Path(tmp) / f"{name}-{fmt}.gguf", StudentShape(**shape), fmt)
                raw[f"{name}_{fmt}"] = llamacpp_speed(path, PROMPT_TOKENS, DECODE_TOKENS, threads=threads,
                                                      repeats=repeats)
                path.unlink()
    return {"threads": threads, "shapes": {**RATE_SHAPES, "tiny": {**TINY_SHAPE, "layers": list(TINY_LAYERS)}},
            "prompt_tokens": PROMPT_TOKENS, "decode_tokens": DECODE_TOKENS, "raw": raw,
            **fit_llamacpp(raw, formats, bandwidth)}


def _solve(equations: list[tuple[float, ...]]) -> tuple[float, ...]:
    """Non-negative least squares for t = a / rate + b * row_overhead + c * op_overhead over the shapes.

    equations: (a, b, c, t) per shape. Returns (rate, row_overhead, op_overhead). With three unknowns,
    every subset of terms is tried and the best all-non-negative fit kept (a term the shapes cannot
    separate from noise comes out 0 rather than negative).
    """
    import itertools

    import numpy as np

    A = np.array([e[:-1] for e in equations], dtype=np.float64)  # (shapes, 3)
    t = np.array([e[-1] for e in equations], dtype=np.float64)
    scale = A.max(axis=0)
    scale[scale == 0] = 1.0
    An = A / scale
    best = None
    for k in range(1, A.shape[1] + 1):
        for cols in itertools.combinations(range(A.shape[1]), k):
            if 0 not in cols:
                continue  # the per-weight rate is always part of the model
            x, *_ = np.linalg.lstsq(An[:, cols], t, rcond=None)
            if (x < 0).any():
                continue
            residual = float(np.sum((An[:, cols] @ x - t) ** 2))
            if best is None or residual < best[0] * (1 - 1e-9):
                full = np.zeros(A.shape[1])
                full[list(cols)] = x / scale[list(cols)]
                best = (residual, full)
    if best is None or best[1][0] <= 0:
        return (float(A[:, 0].sum() / max(t.sum(), 1e-12)), 0.0, 0.0)
    inv_rate, row, op = best[1]
    return (1 / inv_rate, float(row), float(op))


def fit_llamacpp(raw: dict, formats=CALIBRATION_FORMATS, bandwidth: float = float("inf")) -> dict:
    """Overheads and per-format kernel rates from the timings of calibrate_llamacpp, solved with the cost model.

    Per format, the three rate shapes give three equations (kernel time = weights / rate + output rows *
    row overhead + matmuls * op overhead, for decode and for prefill; `_solve`); the tiny models' step time is almost all per-step
    and per-layer overhead, their small kernel term uses the current Q8_0 rates. A few rounds settle both.
    """
    from edgestill.plan.cost import StudentShape, decode_work, prefill_work

    position = PROMPT_TOKENS + DECODE_TOKENS // 2  # the mean context of the timed decode steps
    shapes = {name: StudentShape(**kwargs) for name, kwargs in RATE_SHAPES.items()}
    formats = [f for f in formats if all(f"{name}_{f}" in raw for name in shapes)]
    if "f16" not in formats:
        raise EdgestillError("fit_llamacpp needs f16 timings (attention runs at its rate)")
    ordered = sorted(formats, key=lambda f: f != "f16")
    decode: dict[str, tuple[float, float, float]] = {f: (float("inf"), 0.0, 0.0) for f in formats}
    prefill: dict[str, tuple[float, float, float]] = {}
    token_overhead = layer_overhead = 0.0

    def totals(work):
        return sum(e[3] for e in work.entries), sum(e[4] for e in work.entries)

    for _ in range(8):
        step = {}
        rate, row, _ = decode.get("q8_0", (float("inf"), 0.0, 0.0))
        for layers in TINY_LAYERS:  # in-cache weights: no per-matmul DRAM stream cost (op overhead) here
            work = decode_work(StudentShape(layers=layers, **TINY_SHAPE), {}, "q8_0", position)
            kernel = work.weights / rate + sum(e[4] for e in work.entries) * row
            step[layers] = 1 / raw[f"tiny{layers}"]["decode_tokens_per_s"] - kernel
        lo, hi = TINY_LAYERS
        layer_overhead = max((step[hi] - step[lo]) / (hi - lo), 0.0)
        token_overhead = max(step[lo] - lo * layer_overhead, 0.0)
        for fmt in ordered:
            equations = []
            for name, shape in shapes.items():
                work = prefill_work(shape, {}, fmt, PROMPT_TOKENS)
                flops, outputs = totals(work)
                t = PROMPT_TOKENS / raw[f"{name}_{fmt}"]["prefill_tokens_per_s"]
                t -= token_overhead + shape.layers * layer_overhead
                if fmt == "f16":
                    flops += work.attention_flops  # attention is timed at the f16 rate
                else:
                    t -= work.attention_flops / prefill["f16"][0]
                equations.append((flops, outputs, len(work.entries), t))
            prefill[fmt] = _solve(equations)
        for fmt in formats:
            equations = []
            for name, shape in shapes.items():
                work = decode_work(shape, {}, fmt, position)
                t = 1 / raw[f"{name}_{fmt}"]["decode_tokens_per_s"] - token_overhead - shape.layers * layer_overhead
                t -= work.kv_bytes / bandwidth + work.attention_flops / prefill["f16"][0]
                equations.append((work.weights, sum(e[4] for e in work.entries), len(work.entries), t))
            decode[fmt] = _solve(equations)
    return {"token_overhead_s": token_overhead, "layer_overhead_s": layer_overhead,
            "decode_weights_per_s": {f: v[0] for f, v in decode.items()},
            "decode_row_overhead_s": {f: v[1] for f, v in decode.items()},
            "decode_op_overhead_s": {f: v[2] for f, v in decode.items()},
            "prefill_flops_per_s": {f: v[0] for f, v in prefill.items()},
            "prefill_row_overhead_s": {f: v[1] for f, v in prefill.items()},
            "prefill_op_overhead_s": {f: v[2] for f, v in prefill.items()}}


# --- the profile -----------------------------------------------------------------------------------------

def _cache_key(threads: int) -> str:
    try:
        from importlib.metadata import version

        llama_version = version("llama_cpp_python")
    except Exception:
        llama_version = "none"
    return f"host-{platform.node() or 'machine'}-{threads}t-llamacpp{llama_version}"


def host_measurements(threads: int = 2, cache_dir=None, refresh: bool = False, calibrate: bool = True) -> dict:
    """measure_host (+ calibrate_llamacpp when llama-cpp-python is installed), cached as JSON."""
    path = plan_cache_dir(cache_dir) / f"{_cache_key(threads)}.json"
    data = {}
    if path.is_file() and not refresh:
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    changed = False
    if "host" not in data:
        data["host"] = measure_host(threads)
        changed = True
    if "ram_available_bytes" not in data["host"]:  # caches written before it was recorded
        data["host"]["ram_available_bytes"] = available_ram_bytes()
        changed = True
    if calibrate and "llama.cpp" not in data:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is not None:
            data["llama.cpp"] = calibrate_llamacpp(threads, bandwidth=data["host"]["memory_bandwidth_bytes_per_s"])
            changed = True
    if changed:
        data["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        from edgestill.files import write_text_atomic

        write_text_atomic(path, json.dumps(data, indent=2), "saving the host profile")
    data["cache_path"] = str(path)
    return data


def available_ram_bytes() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 2


def host_profile(threads: int = 2, cache_dir=None, refresh: bool = False, calibrate_llamacpp: bool = True) -> DeviceProfile:
    """This machine as a DeviceProfile (measured once, then read from the cache)."""
    data = host_measurements(threads, cache_dir=cache_dir, refresh=refresh, calibrate=calibrate_llamacpp)
    host = data["host"]
    where = f"{SOURCE}.measure_host ({threads} threads, cached in {data['cache_path']})"

    def measured(value, note=""):
        return Figure(value=float(value), kind="measured", source=where, note=note)

    runtimes = {}
    if "llama.cpp" in data:
        fit = data["llama.cpp"]
        fit_where = f"{SOURCE}.calibrate_llamacpp (synthetic shapes, {threads} threads)"

        def fitted(value, note=""):
            return Figure(value=float(value), kind="fit", source=fit_where, note=note)

        runtimes["llama.cpp"] = RuntimeProfile(
            bandwidth_efficiency=Figure(1.0, "measured", where, "the micro-benchmark's bandwidth is what a process gets"),
            compute_efficiency=fitted(max(fit["prefill_flops_per_s"].values()) / host["matmul_flops_per_s_f32"],
                                      "best per-format prefill FLOP/s / torch f32 matmul FLOP/s"),
            decode_weights_per_s={k: fitted(v) for k, v in fit["decode_weights_per_s"].items()},
            decode_row_overhead_s={k: fitted(v) for k, v in fit["decode_row_overhead_s"].items()},
            prefill_flops_per_s={k: fitted(v) for k, v in fit["prefill_flops_per_s"].items()},
            prefill_row_overhead_s={k: fitted(v) for k, v in fit["prefill_row_overhead_s"].items()},
            decode_op_overhead_s={k: fitted(v) for k, v in fit.get("decode_op_overhead_s", {}).items()},
            prefill_op_overhead_s={k: fitted(v) for k, v in fit.get("prefill_op_overhead_s", {}).items()},
            token_overhead_s=fitted(fit["token_overhead_s"]),
            layer_overhead_s=fitted(max(fit["layer_overhead_s"], 1e-9)),
        )
    else:
        runtimes["llama.cpp"] = RuntimeProfile(
            bandwidth_efficiency=Figure(0.6, "estimated", SOURCE, "llama-cpp-python not installed: no fit; "
                                        "typical decode share of STREAM bandwidth on CPUs"),
            compute_efficiency=Figure(0.3, "estimated", SOURCE, "typical llama.cpp prefill share of f32 matmul peak"),
        )
    return DeviceProfile(
        name="host",
        description=f"this machine ({platform.machine()}, {os.cpu_count()} cores, {threads} threads), measured",
        threads=threads,
        ram_bytes=measured(host["ram_available_bytes"], "MemAvailable at measurement time"),
        memory_bandwidth_bytes_per_s=measured(host["memory_bandwidth_bytes_per_s"],
                                              f"median of a {host['buffer_mib']} MiB sum; spread "
                                              f"{[round(v / 1e9, 1) for v in host['memory_bandwidth_spread']]} GB/s"),
        compute_flops_per_s={"f32": measured(host["matmul_flops_per_s_f32"], "torch.mm 1024^3"),
                             "bf16": measured(host["matmul_flops_per_s_bf16"], "torch.mm 1024^3")},
        runtimes=runtimes,
    )
