"""Cost model: bytes on disk, peak RAM and tokens/s of a student shape with per-layer formats on a device.

EdgeDistill (docs/references.md [8]) prices a bit allocation by memory `sum n_l * b_l / 8` plus a
latency from the device profile; the seed gives no latency formula, so this one is reconstructed [R]
from how llama.cpp runs a decoder on a CPU:

- bytes on disk: every tensor exactly as export_gguf stores it. 2-D weights take their format's real
  bytes (scales included, `Format.weight_bytes`) after llama.cpp's fallback rules
  (`quant.formats.resolve_format`: Q4_K -> Q5_0 -> F16 for rows its blocks do not divide), norms stay
  f32, each tensor is padded to GGUF's 32-byte alignment, a tied head is stored once; plus the
  tensor-info table and the metadata (the tokenizer, measured from the teacher's GGUF when known).
- peak RAM at a context length: the weights (llama.cpp maps the file and touches all of it) + the
  f16 KV cache (2 * layers * context * kv_heads * head_dim * 2 bytes) + the compute buffer, estimated
  as llama.cpp reserves it: float32 activations of one micro-batch of n_ubatch = min(512, context)
  tokens, its logits (n_ubatch * vocab) and attention scores (heads * n_ubatch * context). The
  runtime's own code and libraries are not counted.
- decode tokens/s: one step reads every weight once (the output matrix included, the embedding only
  one row); each weight tensor takes the larger of bytes / (bandwidth * bandwidth_efficiency) and its
  kernel time, weights / decode_weights_per_s[format] + rows * decode_row_overhead_s[format] (every
  output row is one dot product with a fixed cost: narrow matrices run below the streaming rate)
  + decode_op_overhead_s[format] (each matmul starts a new stream from DRAM: prefetch ramp, TLB; the
  model is meant for weights larger than the last-level cache, as every real student is), plus
  the KV cache read, plus token_overhead_s + layers * layer_overhead_s (graph build, thread barriers).
- prefill tokens/s: 2 FLOPs per weight per prompt token at prefill_flops_per_s[format] plus rows x
  tokens * prefill_row_overhead_s[format] + prefill_op_overhead_s[format] (the head only for the last token: generation asks for one
  row of logits), attention 4 * layers * heads * head_dim * T^2 at the f16 rate, plus one step's overhead.

Every rate comes from the device profile (plan/devices.py); where a runtime gives no per-format rate,
compute_flops_per_s[precision] * compute_efficiency stands in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgestill.errors import EdgestillError
from edgestill.plan.devices import DeviceProfile
from edgestill.quant.formats import format_by_name, format_name, format_names, resolve_format

GGUF_ALIGNMENT = 32
# general.* and llama.* keys export_gguf writes (name, counts, rope, ...): 634-678 bytes on a tiny export.
BASE_METADATA_BYTES = 660
GGUF_FORMAT_NAMES = format_names(plan=True)  # the formats the format registry lets the cost model price
_LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def strict_from_dict(cls, data: dict[str, Any]):
    """cls(**data) for a dataclass, refusing keys it does not have (a typo in a saved plan or budget)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise EdgestillError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**data)


@dataclass(frozen=True)
class StudentShape:
    """The hyper-parameters that fix a Llama-style decoder's tensors."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = True
    head_dim: int | None = None

    def __post_init__(self):
        for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"):
            if int(getattr(self, name)) < 1:
                raise EdgestillError(f"StudentShape.{name} = {getattr(self, name)} must be a positive integer")
        if self.head_dim is None and self.hidden % self.heads:
            raise EdgestillError(f"StudentShape: hidden {self.hidden} is not a multiple of heads {self.heads}; "
                                 "set head_dim")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @classmethod
    def from_config(cls, config) -> StudentShape:
        heads = config.num_attention_heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
                   heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)),
                   head_dim=getattr(config, "head_dim", None))

    @classmethod
    def from_gguf(cls, path) -> StudentShape:
        """The shape a GGUF's metadata declares (`<arch>.block_count`, `.embedding_length`, ...)."""
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        fields = reader.fields

        def value(key: str, default=None):
            field = fields.get(key)
            if field is None:
                if default is None:
                    raise EdgestillError(f"GGUF '{path}' has no '{key}' in its metadata; it is not a decoder "
                                         "edgestill can size")
                return default
            return field.contents()

        arch = value("general.architecture")
        heads = int(value(f"{arch}.attention.head_count"))
        tokens = fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else int(value(f"{arch}.vocab_size"))
        hidden = int(value(f"{arch}.embedding_length"))
        key_length = value(f"{arch}.attention.key_length", 0)
        reader_tensors = {t.name for t in reader.tensors}
        return cls(layers=int(value(f"{arch}.block_count")), hidden=hidden,
                   intermediate=int(value(f"{arch}.feed_forward_length")), heads=heads,
                   kv_heads=int(value(f"{arch}.attention.head_count_kv", heads)), vocab=vocab,
                   tied="output.weight" not in reader_tensors,
                   head_dim=int(key_length) if key_length and int(key_length) * heads != hidden else None)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """{HF module name: (out_features, in_features)} of every Linear, the head included."""
        q, kv = self.heads * self.dim_per_head, self.kv_heads * self.dim_per_head
        per_layer = {"self_attn.q_proj": (q, self.hidden), "self_attn.k_proj": (kv, self.hidden),
                     "self_attn.v_proj": (kv, self.hidden), "self_attn.o_proj": (self.hidden, q),
                     "mlp.gate_proj": (self.intermediate, self.hidden), "mlp.up_proj": (self.intermediate, self.hidden),
                     "mlp.down_proj": (self.hidden, self.intermediate)}
        shapes = {f"model.layers.{i}.{name}": s for i in range(self.layers) for name, s in per_layer.items()}
        shapes["lm_head"] = (self.vocab, self.hidden)
        return shapes

    def params(self) -> int:
        """Unique parameters (a tied head counted once), norms included, as slice.count_params."""
        linear = sum(o * i for o, i in self.linear_shapes().values())
        embedding = 0 if self.tied else self.vocab * self.hidden
        return linear + embedding + self.hidden * (2 * self.layers + 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudentShape:
        return strict_from_dict(cls, data)


def training_flops_per_token(shape: StudentShape, seq_len: int, frozen_head: bool = True) -> float:
    """Matmul FLOPs of one token of student training from a cached teacher, forward and backward.

    Every Linear: 2 FLOPs per weight forward, 2 for the gradient of its input, 2 for the gradient of its weight
    when it trains; a tied head frozen with the embedding (distill.freeze_embeddings) skips the last. Attention's
    QK^T and AV: 2 x 2 x (seq_len / 2 keys on average, causal) x heads x head_dim per layer forward, 3x that in
    all. Norms, activations, the loss and the optimizer are left out: this is the bound's numerator, not a
    prediction of step time."""
    flops = 0.0
    for name, (out_features, in_features) in shape.linear_shapes().items():
        weights = out_features * in_features
        flops += (4 if name == "lm_head" and frozen_head else 6) * weights
    flops += 3 * 2 * seq_len * shape.heads * shape.dim_per_head * shape.layers
    return flops


# --- which format each tensor is stored in -------------------------------------------------------------

def linear_formats(shape: StudentShape, plan: dict[str, str], default: str = "q8_0") -> dict[str, tuple[str, str]]:
    """{HF Linear name: (requested format, stored format)}: first matching plan entry, else default.

    Plan keys follow QuantConfig: an exact module name or a `re:` regex; values are format names.
    """
    from edgestill.quant.fake_quant import pattern_matches

    for pattern, fmt in plan.items():
        if fmt not in GGUF_FORMAT_NAMES:
            raise EdgestillError(f"plan[{pattern!r}] = {fmt!r} is not a GGUF format; use one of {', '.join(GGUF_FORMAT_NAMES)}")
    if default not in GGUF_FORMAT_NAMES:
        raise EdgestillError(f"default format {default!r} is not a GGUF format; use one of {', '.join(GGUF_FORMAT_NAMES)}")
    out = {}
    for name, (rows, cols) in shape.linear_shapes().items():
        requested = next((fmt for pattern, fmt in plan.items() if pattern_matches(pattern, name)), default)
        stored, _ = resolve_format(format_by_name(requested), cols)
        out[name] = (requested, format_name(stored))
    return out


def gguf_tensor_plan(shape: StudentShape, plan: dict[str, str], default: str = "q8_0") -> dict[str, str]:
    """{GGUF tensor name: format} for export_gguf(..., quantize_fn=format_quantize_fn(per_tensor=...))."""
    from edgestill.export.gguf import hf_to_gguf_name

    out = {}
    for name, (requested, _) in linear_formats(shape, plan, default).items():
        gguf = "token_embd.weight" if name == "lm_head" and shape.tied else hf_to_gguf_name(f"{name}.weight")
        out[gguf] = requested
    if not shape.tied:
        out["token_embd.weight"] = default
    return out


@dataclass(frozen=True)
class TensorCost:
    gguf_name: str
    shape: tuple[int, ...]  # GGUF row-major (rows, cols) or (n,) for norms
    fmt: str  # stored format ('f32' for norms)
    data_bytes: int  # unpadded


def _pad(n: int, align: int = GGUF_ALIGNMENT) -> int:
    return (n + align - 1) // align * align


def tensor_costs(shape: StudentShape, plan: dict[str, str], default: str = "q8_0") -> list[TensorCost]:
    """Every tensor export_gguf writes, in its stored format and bytes."""
    from edgestill.export.gguf import hf_to_gguf_name

    costs = []
    shapes = shape.linear_shapes()
    for name, (_, stored) in linear_formats(shape, plan, default).items():
        rows, cols = shapes[name]
        gguf = "token_embd.weight" if name == "lm_head" and shape.tied else hf_to_gguf_name(f"{name}.weight")
        costs.append(TensorCost(gguf, (rows, cols), stored, format_by_name(stored).weight_bytes((rows, cols))))
    if not shape.tied:
        stored = format_name(resolve_format(format_by_name(default), shape.hidden)[0])
        costs.append(TensorCost("token_embd.weight", (shape.vocab, shape.hidden), stored,
                                format_by_name(stored).weight_bytes((shape.vocab, shape.hidden))))
    for i in range(shape.layers):
        for norm in ("attn_norm", "ffn_norm"):
            costs.append(TensorCost(f"blk.{i}.{norm}.weight", (shape.hidden,), "f32", 4 * shape.hidden))
    costs.append(TensorCost("output_norm.weight", (shape.hidden,), "f32", 4 * shape.hidden))
    return costs


def gguf_bytes(shape: StudentShape, plan: dict[str, str], default: str = "q8_0", metadata_bytes: int = 0) -> dict[str, int]:
    """Bytes of the GGUF file: {'data', 'tensor_info', 'metadata', 'file'} (data exact, metadata as given + base)."""
    costs = tensor_costs(shape, plan, default)
    data = sum(_pad(c.data_bytes) for c in costs)
    # tensor info: name (u64 length + bytes), n_dims u32, dims u64 each, type u32, offset u64
    info = sum(8 + len(c.gguf_name) + 4 + 8 * len(c.shape) + 4 + 8 for c in costs)
    header = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count
    meta = BASE_METADATA_BYTES + int(metadata_bytes)
    return {"data": data, "tensor_info": info, "metadata": meta, "file": _pad(header + meta + info) + data}


_PER_TOKEN_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def tokenizer_metadata_bytes(gguf_path, kept=None, merges=None) -> int:
    """Bytes of the `tokenizer.*` key/values of a GGUF (what export_gguf copies from a teacher).

    kept, merges: a trimmed vocabulary (models/vocab.py's VocabTrim: new id -> teacher id, and the merges it keeps,
    'a b' strings or pairs): the bytes export_gguf writes for a student with that vocabulary, which keeps the per-token
    arrays' kept entries, writes those merges (none: no merges key) and leaves out a special token id that was cut.
    """
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(gguf_path))
    kept_set = None if kept is None else set(int(i) for i in kept)
    total = 0
    for key, fld in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        if kept is None:
            total += sum(int(part.nbytes) for part in fld.parts)
            continue
        head = 8 + len(key.encode()) + 4  # key (u64 length + bytes), value type (u32)
        if fld.types[0] == GGUFValueType.ARRAY:
            if len(fld.types) != 2:
                continue  # an empty or nested array: export copies none
            items = [fld.parts[i] for i in fld.data]
            string = fld.types[1] == GGUFValueType.STRING
            if key in _PER_TOKEN_KEYS:
                items = [items[i] for i in kept]
            elif key == "tokenizer.ggml.merges":
                if not merges:
                    continue  # export leaves an empty merges list out
                items = [(m if isinstance(m, str) else " ".join(m)).encode() for m in merges]
            total += head + 4 + 8 + sum((8 + len(bytes(x))) if string else int(x.nbytes) for x in items)
        elif key.endswith("_token_id") and fld.types[0] != GGUFValueType.STRING:
            total += (head + int(fld.parts[fld.data[0]].nbytes)) if int(fld.contents()) in kept_set else 0
        else:
            total += sum(int(part.nbytes) for part in fld.parts)
    return total


# --- work per token ---------------------------------------------------------------------------------------

@dataclass
class Work:
    """What one decode step or one prefill reads and computes: one entry per matmul weight.

    entries: (stored format, weights, bytes, FLOPs, outputs) of each weight tensor the step multiplies
    with; outputs = rows x tokens multiplied (each a dot product with its own fixed cost).
    """

    entries: list[tuple[str, int, int, float, int]] = field(default_factory=list)
    kv_bytes: float = 0.0
    attention_flops: float = 0.0

    def add(self, fmt: str, weights: int, nbytes: int, flops: float, outputs: int) -> None:
        self.entries.append((fmt, weights, nbytes, flops, outputs))

    @property
    def weights(self) -> int:
        return sum(e[1] for e in self.entries)

    @property
    def weight_bytes(self) -> int:
        return sum(e[2] for e in self.entries)

    @property
    def flops(self) -> float:
        return sum(e[3] for e in self.entries) + self.attention_flops


def _matmul_costs(shape: StudentShape, plan: dict[str, str], default: str):
    for c in tensor_costs(shape, plan, default):
        if len(c.shape) == 2 and (c.gguf_name != "token_embd.weight" or shape.tied):
            yield c  # every matmul weight; an untied embedding is only looked up


def decode_work(shape: StudentShape, plan: dict[str, str], default: str, position: int) -> Work:
    """One decode step at `position` tokens of context: every weight once, the KV cache so far."""
    work = Work()
    for c in _matmul_costs(shape, plan, default):
        n = c.shape[0] * c.shape[1]
        work.add(c.fmt, n, c.data_bytes, 2.0 * n, c.shape[0])
    kv_dim = shape.kv_heads * shape.dim_per_head
    work.kv_bytes = 2 * shape.layers * position * kv_dim * 2  # K and V, f16
    work.attention_flops = 4.0 * shape.layers * shape.heads * shape.dim_per_head * position
    return work


def prefill_work(shape: StudentShape, plan: dict[str, str], default: str, tokens: int) -> Work:
    """A prompt of `tokens` as one batch: every layer weight per token, the head for the last token only."""
    work = Work()
    for c in _matmul_costs(shape, plan, default):
        n = c.shape[0] * c.shape[1]
        rows = 1 if c.gguf_name in ("token_embd.weight", "output.weight") else tokens
        work.add(c.fmt, n, c.data_bytes, 2.0 * n * rows, c.shape[0] * rows)
    work.attention_flops = 4.0 * shape.layers * shape.heads * shape.dim_per_head * tokens * tokens
    return work


# --- rates from a device profile ------------------------------------------------------------------------

_PRECISION = {"f16": ("f16", "bf16", "f32")}
_INT_PRECISION = ("int8", "f16", "f32")


def _compute_rate(device: DeviceProfile, fmt: str, efficiency: float) -> float:
    for precision in _PRECISION.get(fmt, _INT_PRECISION):
        if precision in device.compute_flops_per_s:
            return device.compute_flops_per_s[precision].value * efficiency
    return next(iter(device.compute_flops_per_s.values())).value * efficiency


@dataclass(frozen=True)
class Rates:
    """The rates a device profile gives one runtime (see the module doc)."""

    bandwidth_bytes_per_s: float
    decode_weights_per_s: dict[str, float]
    prefill_flops_per_s: dict[str, float]
    token_overhead_s: float
    layer_overhead_s: float
    decode_row_overhead_s: dict[str, float] = field(default_factory=dict)
    prefill_row_overhead_s: dict[str, float] = field(default_factory=dict)
    decode_op_overhead_s: dict[str, float] = field(default_factory=dict)
    prefill_op_overhead_s: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, device: DeviceProfile, runtime: str = "llama.cpp") -> Rates:
        rt = device.runtime(runtime)
        prefill, decode = {}, {}
        for fmt in GGUF_FORMAT_NAMES:
            fallback = _compute_rate(device, fmt, rt.compute_efficiency.value)
            prefill[fmt] = rt.prefill_flops_per_s[fmt].value if fmt in rt.prefill_flops_per_s else fallback
            decode[fmt] = rt.decode_weights_per_s[fmt].value if fmt in rt.decode_weights_per_s else fallback / 2
        return cls(bandwidth_bytes_per_s=device.memory_bandwidth_bytes_per_s.value * rt.bandwidth_efficiency.value,
                   decode_weights_per_s=decode, prefill_flops_per_s=prefill,
                   token_overhead_s=rt.token_overhead_s.value if rt.token_overhead_s else 0.0,
                   layer_overhead_s=rt.layer_overhead_s.value if rt.layer_overhead_s else 0.0,
                   decode_row_overhead_s={k: f.value for k, f in rt.decode_row_overhead_s.items()},
                   prefill_row_overhead_s={k: f.value for k, f in rt.prefill_row_overhead_s.items()},
                   decode_op_overhead_s={k: f.value for k, f in rt.decode_op_overhead_s.items()},
                   prefill_op_overhead_s={k: f.value for k, f in rt.prefill_op_overhead_s.items()})

    def decode_tensor_s(self, fmt: str, weights: int, nbytes: int, outputs: int) -> float:
        """One weight's share of a decode step: memory-bound or kernel-bound, whichever is slower."""
        kernel = (weights / self.decode_weights_per_s[fmt] + outputs * self.decode_row_overhead_s.get(fmt, 0.0)
                  + self.decode_op_overhead_s.get(fmt, 0.0))
        return max(nbytes / self.bandwidth_bytes_per_s, kernel)

    def prefill_tensor_s(self, fmt: str, flops: float, nbytes: int, outputs: int) -> float:
        kernel = (flops / self.prefill_flops_per_s[fmt] + outputs * self.prefill_row_overhead_s.get(fmt, 0.0)
                  + self.prefill_op_overhead_s.get(fmt, 0.0))
        return max(kernel, nbytes / self.bandwidth_bytes_per_s)


def decode_seconds(work: Work, layers: int, rates: Rates) -> float:
    t = rates.token_overhead_s + layers * rates.layer_overhead_s + work.kv_bytes / rates.bandwidth_bytes_per_s
    t += sum(rates.decode_tensor_s(fmt, n, nbytes, outputs) for fmt, n, nbytes, _, outputs in work.entries)
    return t + work.attention_flops / rates.prefill_flops_per_s["f16"]


def prefill_seconds(work: Work, layers: int, rates: Rates) -> float:
    t = rates.token_overhead_s + layers * rates.layer_overhead_s
    t += sum(rates.prefill_tensor_s(fmt, flops, nbytes, outputs) for fmt, _, nbytes, flops, outputs in work.entries)
    return t + work.attention_flops / rates.prefill_flops_per_s["f16"]


# --- the prediction ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """What the speeds and RAM are predicted for: a context length, a prompt, a decode position."""

    context_tokens: int = 512
    prompt_tokens: int = 64
    decode_position: int | None = None  # context at which a decode step is timed (default: prompt_tokens)
    runtime: str = "llama.cpp"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        return cls(**data)


@dataclass(frozen=True)
class Prediction:
    file_bytes: int
    weight_bytes: int  # tensor data (the part of the file that is loaded)
    kv_cache_bytes: int
    compute_buffer_bytes: int
    peak_ram_bytes: int
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    bits_per_weight: float  # weight bytes * 8 / parameters

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prediction:
        return cls(**data)


def kv_cache_bytes(shape: StudentShape, context_tokens: int) -> int:
    return 2 * shape.layers * context_tokens * shape.kv_heads * shape.dim_per_head * 2  # K and V, f16


def compute_buffer_bytes(shape: StudentShape, context_tokens: int) -> int:
    ubatch = min(512, context_tokens)
    per_token = shape.vocab + 4 * shape.hidden + 2 * shape.intermediate + shape.heads * context_tokens
    return 4 * ubatch * per_token


def gguf_ram_bytes(path, context_tokens: int) -> dict[str, int]:
    """What llama.cpp holds in memory for a GGUF file with a context of `context_tokens`: the file (mapped), the
    KV cache and the compute buffer, as `predict` counts them, and their total."""
    shape = StudentShape.from_gguf(path)
    parts = {"file": Path(path).stat().st_size, "kv_cache": kv_cache_bytes(shape, context_tokens),
             "compute_buffer": compute_buffer_bytes(shape, context_tokens)}
    return {**parts, "total": sum(parts.values())}


def predict(shape: StudentShape, plan: dict[str, str], device: DeviceProfile, default: str = "q8_0",
            workload: Workload = Workload(), metadata_bytes: int = 0) -> Prediction:
    """Bytes, peak RAM and tokens/s of `shape` with formats `plan` (+ `default`) on `device`."""
    sizes = gguf_bytes(shape, plan, default, metadata_bytes)
    kv = kv_cache_bytes(shape, workload.context_tokens)
    buffer = compute_buffer_bytes(shape, workload.context_tokens)
    position = workload.decode_position if workload.decode_position is not None else workload.prompt_tokens
    rates = Rates.of(device, workload.runtime)
    decode_s = decode_seconds(decode_work(shape, plan, default, position), shape.layers, rates)
    prefill_s = prefill_seconds(prefill_work(shape, plan, default, workload.prompt_tokens), shape.layers, rates)
    return Prediction(
        file_bytes=sizes["file"], weight_bytes=sizes["data"], kv_cache_bytes=kv, compute_buffer_bytes=buffer,
        peak_ram_bytes=sizes["file"] + kv + buffer,
        decode_tokens_per_s=1.0 / decode_s, prefill_tokens_per_s=workload.prompt_tokens / prefill_s,
        bits_per_weight=8.0 * sizes["data"] / max(shape.params(), 1),
    )
