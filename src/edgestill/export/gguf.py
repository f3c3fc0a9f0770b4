"""Write a transformers Llama-style causal LM as a llama.cpp GGUF file (architecture `llama`).

What it does, in the order llama.cpp's own `convert_hf_to_gguf.py` (class `LlamaModel`) does it:
hyper-parameters go to `llama.*` metadata; HF tensor names map to GGUF names (`blk.N.attn_q.weight`,
...); the Q and K projections are permuted from HF's rotate-half RoPE layout to the adjacent-pair
layout llama.cpp's `llama` graph rotates; 2-D weights are stored as `tensor_type`, 1-D norms as f32.
A tied head writes no `output.weight` (llama.cpp then reuses `token_embd.weight`).

Tokenizer metadata either comes verbatim from a GGUF (`teacher_gguf`: every `tokenizer.*` field,
chat template included, which keeps llama.cpp's pre-tokenizer identical to the teacher's) or is
built from a byte-level BPE HF tokenizer (`tokenizer.ggml.model = gpt2`, pre-tokenizer `default`).

Quantization goes through one function, `quantize_tensor(name, array, ggml_type)`; pass another
with the same signature as `export_gguf(..., quantize_fn=...)` to plug in a different packer.

    report = export_gguf(student, tokenizer, "student-q8_0.gguf", tensor_type="q8_0",
                         teacher_gguf=resolve_model_path("smollm2-135m"))
    report.fallbacks  # {gguf tensor name: why it was not stored as q8_0}
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgestill.errors import EdgestillError
from edgestill.files import atomic_path
from edgestill.models.load import check_gguf

# `gguf` is imported inside the functions so that importing edgestill stays fast.
__all__ = ["ExportReport", "export_gguf", "permute_for_rope", "quantize_tensor", "tensor_types"]

# A weight whose row length is not a multiple of the requested type's block size (32 for every
# type above) is stored as f16 instead: lossless enough, and every llama.cpp backend reads it.
FALLBACK_TYPE = "f16"
SUPPORTED_MODEL_TYPES = ("llama",)

# HF module path inside a decoder layer -> GGUF tensor base name (same map as gguf.TensorNameMap).
_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# llama.cpp token types (llama_token_type / gguf.TokenType)
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5


@dataclass
class ExportReport:
    path: str
    tensor_type: str  # what was asked for
    file_bytes: int
    n_tensors: int
    tensor_types: dict[str, str] = field(default_factory=dict)  # gguf name -> ggml type written
    fallbacks: dict[str, str] = field(default_factory=dict)  # gguf name -> why it is not `tensor_type`
    tokenizer_source: str = ""  # the teacher GGUF path, or "hf"
    file_type: str | None = None  # general.file_type written, a gguf.LlamaFileType name (MOSTLY_Q4_0)


def tensor_types() -> tuple[str, ...]:
    """What `edgestill export --type` accepts for GGUF: f32 and every GGUF format of the registry (quant/formats.py)."""
    from edgestill.quant.formats import format_names

    return ("f32", *format_names(gguf=True))


def _ggml_type(name: str):
    from gguf import GGMLQuantizationType

    key = name.lower()
    allowed = tensor_types()
    if key not in allowed:
        raise EdgestillError(f"tensor_type '{name}' is not supported for GGUF export; choose one of {', '.join(allowed)}")
    return GGMLQuantizationType[key.upper()]


def quantize_tensor(name: str, array: np.ndarray, ggml_type) -> tuple[np.ndarray, object]:
    """Encode one tensor for the file: returns (data, ggml type actually used).

    `data` is float32/float16 for F32/F16, else the packed uint8 blocks from `gguf.quants.quantize`
    (shape (..., row_bytes)). 1-D tensors (norms) stay f32: llama.cpp multiplies them in f32. A
    2-D weight whose row length does not divide into the type's blocks falls back to FALLBACK_TYPE;
    the caller sees the returned type differ from the one asked for and records why.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim == 1 or ggml_type == GGMLQuantizationType.F32:
        return array, GGMLQuantizationType.F32
    if ggml_type == GGMLQuantizationType.F16:
        return array.astype(np.float16), GGMLQuantizationType.F16
    block_size = GGML_QUANT_SIZES[ggml_type][0]
    if array.shape[-1] % block_size:
        fallback = GGMLQuantizationType[FALLBACK_TYPE.upper()]
        return quantize_tensor(name, array, fallback)
    return quantize(array, ggml_type), ggml_type


def permute_for_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K output rows from HF's rotate-half RoPE layout to llama.cpp's adjacent pairs.

    HF rotates the pair (i, i + head_dim/2) of each head; llama.cpp's `llama` graph rotates
    (2i, 2i + 1). Row 2i of a head takes HF row i, row 2i + 1 takes HF row i + head_dim/2, so both
    engines compute the same attention scores. Works for weights (rows, cols) and biases (rows,).
    """
    rows = weight.shape[0]
    head_dim = rows // n_head
    if head_dim * n_head != rows or head_dim % 2:
        raise EdgestillError(f"cannot split {rows} projection rows into {n_head} heads of even size")
    return (weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:])  # (H, 2, D/2, ...)
            .swapaxes(1, 2)  # (H, D/2, 2, ...)
            .reshape(weight.shape))


def _rope_settings(config) -> dict:
    """Rope theta and scaling from a transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x (`rope_parameters`) config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", getattr(config, "rope_theta", None))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    return {"theta": float(theta if theta is not None else 10000.0), "type": rope_type, **{
        k: v for k, v in merged.items() if k not in ("rope_theta", "rope_type", "type")}}


def _llama3_rope_factors(config, rope: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.x rope scaling; llama.cpp reads them from `rope_freqs.weight`."""
    freqs = 1.0 / (rope["theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _file_type(weight_types: list[str]) -> str | None:
    """general.file_type (a gguf.LlamaFileType name) of a file whose 2-D weights have these ggml types.

    llama.cpp's convention: the type most of them have (llama_model_loader guesses the file type that way
    when the key is absent; llama-quantize labels its mixes by their base type, the one most tensors get),
    named as the format registry says (MOSTLY_Q4_0, ...). A tie goes to the type written first; all F32 is
    ALL_F32. A type outside the registry (a custom quantize_fn) gets MOSTLY_<type> when gguf has one, else
    no key (llama.cpp then guesses).
    """
    from collections import Counter

    from gguf import LlamaFileType

    from edgestill.quant.formats import FORMAT_NAMES, format_spec

    counts = Counter(weight_types)
    if not counts:
        return "ALL_F32"
    top = max(counts, key=counts.get)  # the first of the most common, in the order written
    if top == "F32":
        return "ALL_F32"
    if top.lower() in FORMAT_NAMES:
        return format_spec(top).file_type
    return f"MOSTLY_{top}" if f"MOSTLY_{top}" in LlamaFileType.__members__ else None


def _fallback_reason(shape, requested, written) -> str:
    from gguf import GGML_QUANT_SIZES

    block = GGML_QUANT_SIZES[requested][0]
    if shape[-1] % block:
        return f"row length {shape[-1]} is not a multiple of {requested.name}'s block size {block}; stored as {written.name}"
    return f"stored as {written.name} by the quantize function"


def _check_supported(model) -> None:
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EdgestillError(
            f"GGUF export supports Llama-style decoders ({', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"this model's architecture is '{model_type}' ({type(model).__name__})"
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise EdgestillError(f"GGUF export of '{model_type}' needs hidden_act=silu (llama.cpp's llama graph); got '{act}'")


def _hf_tokenizer_metadata(tokenizer, n_vocab: int) -> dict:
    """gpt2-style BPE metadata from a byte-level BPE HF tokenizer (its tokenizer.json)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EdgestillError(
            f"{type(tokenizer).__name__} has no fast (tokenizer.json) backend; pass teacher_gguf=<the teacher's .gguf> "
            "to copy its tokenizer metadata instead"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise EdgestillError(
            f"only byte-level BPE tokenizers can be written as GGUF metadata (this one is {model.get('type')} with "
            f"pre-tokenizer {pre[:80]}); pass teacher_gguf=<the teacher's .gguf> to copy its tokenizer instead"
        )
    tokens: list[str | None] = [None] * n_vocab
    types = [_TOKEN_NORMAL] * n_vocab
    for text, idx in model["vocab"].items():
        if idx < n_vocab:
            tokens[idx] = text
    for idx, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if idx < n_vocab:
            tokens[idx] = added.content
            types[idx] = _TOKEN_CONTROL if added.special else _TOKEN_USER_DEFINED
    for idx, text in enumerate(tokens):
        if text is None:  # the embedding has more rows than the tokenizer has tokens
            tokens[idx], types[idx] = f"[PAD{idx}]", _TOKEN_UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    ids = tokenizer("a")["input_ids"]  # does encoding add BOS/EOS? ask the tokenizer rather than guess
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unknown": tokenizer.unk_token_id,
               "padding": tokenizer.pad_token_id}
    for kind, idx in special.items():
        if idx is not None:
            meta[f"tokenizer.ggml.{kind}_token_id"] = int(idx)
    meta["tokenizer.ggml.add_bos_token"] = bool(ids and special["bos"] is not None and ids[0] == special["bos"])
    meta["tokenizer.ggml.add_eos_token"] = bool(ids and special["eos"] is not None and ids[-1] == special["eos"])
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        meta["tokenizer.chat_template"] = template
    return meta


def _write_hf_tokenizer(writer, meta: dict) -> None:
    from gguf import GGUFValueType

    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif key == "tokenizer.ggml.token_type":
            writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
        elif value:  # a list of strings (an empty merges list is left out: the writer rejects empty arrays)
            writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)


_PER_TOKEN = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def _trimmed_merges(tokenizer) -> list[bytes]:
    """A (trimmed) HF tokenizer's merges as GGUF writes them: 'a b', UTF-8."""
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [(m if isinstance(m, str) else " ".join(m)).encode() for m in merges]


def _copy_tokenizer_fields(writer, teacher_gguf: Path, n_vocab: int, kept: list[int] | None = None,
                           merges: list[bytes] | None = None) -> None:
    """Copy every `tokenizer.*` field of a GGUF, keeping each value's GGUF type (strings as raw bytes).

    `kept` (a student with a trimmed vocabulary, models/vocab.py): its new id -> the teacher's id. The per-token
    arrays keep those entries, the special token ids are renumbered (one that was trimmed is left out), and the
    merges are `merges`, the trimmed tokenizer's."""
    from gguf import GGUFReader, GGUFValueType

    check_gguf(teacher_gguf)
    reader = GGUFReader(str(teacher_gguf))
    new_id = None
    if kept is not None:
        new_id = {old: new for new, old in enumerate(kept)}
    for key, fld in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = fld.types[0]
        if main == GGUFValueType.ARRAY:
            sub = fld.types[-1] if len(fld.types) > 1 else None
            if sub is None or len(fld.types) > 2:
                continue  # an empty or nested array: nothing llama.cpp's tokenizer reads
            if sub == GGUFValueType.STRING:
                value = [bytes(fld.parts[i]) for i in fld.data]
            else:
                value = fld.contents()
            if kept is not None and key in _PER_TOKEN:
                value = [value[i] for i in kept]
            elif kept is not None and key == "tokenizer.ggml.merges":
                value = merges
            if key == "tokenizer.ggml.tokens" and len(value) != n_vocab:
                raise EdgestillError(
                    f"the tokenizer in '{teacher_gguf}' has {len(value)} tokens but the model's embedding has "
                    f"{n_vocab} rows; copy tokenizer metadata only from the GGUF the student was made from"
                )
            writer.add_key_value(key, value, main, sub_type=sub)
        elif main == GGUFValueType.STRING:
            writer.add_key_value(key, bytes(fld.parts[fld.data[0]]), main)
        elif new_id is not None and key.endswith("_token_id"):
            if int(fld.contents()) in new_id:  # a special token the trimmed vocabulary dropped is left out
                writer.add_key_value(key, new_id[int(fld.contents())], main)
        else:
            writer.add_key_value(key, fld.contents(), main)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise EdgestillError(f"'{teacher_gguf}' holds no tokenizer (no tokenizer.ggml.tokens field)")


def _hf_tensors(model):
    """Yield (gguf name, float32 numpy array) for every weight, Q/K permuted for llama.cpp's RoPE."""
    config = model.config
    n_head = config.num_attention_heads
    n_kv_head = getattr(config, "num_key_value_heads", None) or n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = model.state_dict()
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd.weight when output.weight is absent
        array = tensor.detach().to("cpu").float().numpy()
        if hf_name in _GLOBAL_TENSORS:
            yield _GLOBAL_TENSORS[hf_name], array
            continue
        parts = hf_name.split(".")  # model.layers.{i}.{module...}.{weight|bias}
        if parts[:2] != ["model", "layers"] or len(parts) < 5:
            raise EdgestillError(f"GGUF export does not know where tensor '{hf_name}' goes in llama.cpp's llama graph")
        block, module, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
        if module not in _LAYER_TENSORS:
            raise EdgestillError(f"GGUF export does not know where tensor '{hf_name}' goes in llama.cpp's llama graph")
        if module == "self_attn.q_proj":
            array = permute_for_rope(array, n_head)
        elif module == "self_attn.k_proj":
            array = permute_for_rope(array, n_kv_head)
        yield f"blk.{block}.{_LAYER_TENSORS[module]}.{kind}", array


def export_gguf(model, tokenizer, path, tensor_type: str = "f16", teacher_gguf=None,
                quantize_fn: Callable = quantize_tensor) -> ExportReport:
    """Write `model` (a transformers LlamaForCausalLM) and its tokenizer to `path` as a llama.cpp GGUF.

    tensor_type: f32 or a GGUF format of the registry (tensor_types(): f16, q8_0, q4_0, ...) for 2-D weights
        (norms stay f32).
    teacher_gguf: a GGUF whose `tokenizer.*` fields are copied (recommended for students sliced from
        it); without it the metadata is built from `tokenizer` (byte-level BPE only).
    quantize_fn: `quantize_tensor`'s signature; swap in another packer without touching this function.
    The header's general.file_type is what was written: the type of most 2-D weights (_file_type), and
    general.quantization_version is ggml's GGML_QNT_VERSION, as llama.cpp's own converter and quantizer write.
    The file is written to a temporary name and renamed into place, so `path` is never half-written.
    """
    import gguf

    from edgestill.quant.formats import format_names

    _check_supported(model)
    requested = _ggml_type(tensor_type)
    if quantize_fn is quantize_tensor and tensor_type.lower() in format_names(gguf=True, quantized=True):
        quantize_fn = format_quantize_fn()  # edgestill.quant's exact packers (the gguf package cannot pack Q4_K)
    config = model.config
    n_head = config.num_attention_heads
    n_kv_head = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    n_vocab = model.get_input_embeddings().weight.shape[0]
    rope = _rope_settings(config)
    if rope["type"] not in ("default", "linear", "llama3"):
        raise EdgestillError(f"GGUF export handles rope types default, linear and llama3; this model uses '{rope['type']}'")

    path = Path(path)
    report = ExportReport(path=str(path), tensor_type=tensor_type.lower(), file_bytes=0, n_tensors=0,
                          tokenizer_source=str(teacher_gguf) if teacher_gguf is not None else "hf")
    with atomic_path(path, "writing the GGUF") as tmp:  # all of the file under its name, or none of it
        writer = gguf.GGUFWriter(str(tmp), "llama")
        try:
            name = Path(str(getattr(config, "_name_or_path", "") or "edgestill-student")).name or "edgestill-student"
            writer.add_type("model")
            writer.add_name(name)
            writer.add_block_count(config.num_hidden_layers)
            writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
            writer.add_embedding_length(config.hidden_size)
            writer.add_feed_forward_length(config.intermediate_size)
            writer.add_head_count(n_head)
            writer.add_head_count_kv(n_kv_head)
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
            writer.add_rope_dimension_count(head_dim)
            writer.add_rope_freq_base(rope["theta"])
            if rope["type"] == "linear":
                writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                writer.add_rope_scaling_factor(float(rope["factor"]))
            writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
            writer.add_vocab_size(n_vocab)

            trim = getattr(config, "edgestill_vocab_trim", None)  # models/vocab.py: the student keeps some tokens
            if teacher_gguf is not None and trim:
                _copy_tokenizer_fields(writer, Path(teacher_gguf), n_vocab, trim["kept"], _trimmed_merges(tokenizer))
            elif teacher_gguf is not None:
                _copy_tokenizer_fields(writer, Path(teacher_gguf), n_vocab)
            else:
                _write_hf_tokenizer(writer, _hf_tokenizer_metadata(tokenizer, n_vocab))

            extra = []
            if rope["type"] == "llama3":
                extra.append(("rope_freqs.weight", _llama3_rope_factors(config, rope, head_dim)))
            weight_types = []  # ggml type of each 2-D weight written
            for gguf_name, array in itertools.chain(_hf_tensors(model), extra):
                data, written = quantize_fn(gguf_name, array, requested)  # one tensor at a time: peak memory stays low
                writer.add_tensor(gguf_name, data, raw_dtype=written if data.dtype == np.uint8 else None)
                report.tensor_types[gguf_name] = written.name.lower()
                if array.ndim > 1:
                    weight_types.append(written.name)
                wanted = getattr(quantize_fn, "planned", {}).get(gguf_name, requested.name.lower())
                if written.name.lower() != wanted and array.ndim > 1:
                    report.fallbacks[gguf_name] = _fallback_reason(array.shape, gguf.GGMLQuantizationType[wanted.upper()], written)
            report.n_tensors = len(report.tensor_types)
            # The header keys that describe the tensors, now that they are known (a QAT run's requested type is f16).
            report.file_type = _file_type(weight_types)
            if report.file_type is not None:
                writer.add_file_type(int(gguf.LlamaFileType[report.file_type]))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    report.file_bytes = path.stat().st_size
    return report


def hf_to_gguf_name(hf_name: str) -> str:
    """`model.layers.3.mlp.down_proj.weight` -> `blk.3.ffn_down.weight` (llama.cpp's names)."""
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    parts = hf_name.split(".")
    module = ".".join(parts[3:-1])
    if parts[:2] != ["model", "layers"] or module not in _LAYER_TENSORS:
        raise EdgestillError(f"GGUF export does not know where tensor '{hf_name}' goes in llama.cpp's llama graph")
    return f"blk.{parts[2]}.{_LAYER_TENSORS[module]}.{parts[-1]}"


def trained_tensor_types(quant_report: list[dict], model) -> dict[str, object]:
    """{GGUF tensor name: format} for the weights a quantization-aware run trained (its quant_report.json rows,
    whose `format` is the format each Linear is stored in), for format_quantize_fn.

    A tied head is stored once, as the embedding, in the head's trained format."""
    from edgestill.quant.formats import format_from_dict

    per_tensor = {}
    tied_head = getattr(model.config, "tie_word_embeddings", False)
    for layer in quant_report:
        fmt = format_from_dict(layer["format"])
        for module in [layer["name"], *layer.get("tied", [])]:
            hf_name = module + ".weight"
            if hf_name == "lm_head.weight" and tied_head:
                hf_name = "model.embed_tokens.weight"
            per_tensor[hf_to_gguf_name(hf_name)] = fmt
    return per_tensor


def format_quantize_fn(per_tensor: dict[str, object] | None = None) -> Callable:
    """A `quantize_fn` for export_gguf that encodes 2-D weights with edgestill.quant's exact packers.

    per_tensor maps GGUF tensor names to GGUF formats: a format config (trained_tensor_types) or a name
    (tensor_types(): f32, f16, q8_0, ...; plan.cost.gguf_tensor_plan); others get the type export_gguf was
    asked for. Rows a format's blocks do not divide fall back as quant.formats.resolve_format says
    (Q4_K: Q5_0, then F16; the 32-weight formats: F16).
    """
    import torch
    from gguf import GGMLQuantizationType

    from edgestill.quant.formats import as_format, format_spec, gguf_quantize, resolve_format

    formats = {name: fmt if fmt == "f32" else as_format(fmt) for name, fmt in (per_tensor or {}).items()}
    for name, fmt in formats.items():
        if fmt != "f32" and not format_spec(fmt).gguf:
            raise EdgestillError(f"{name}: {fmt} is not a GGUF format; GGUF stores {', '.join(tensor_types())}")

    def quantize(name: str, array: np.ndarray, ggml_type) -> tuple[np.ndarray, object]:
        wanted = formats.get(name, ggml_type.name.lower())
        if array.ndim == 1 or wanted == "f32":
            return quantize_tensor(name, array, GGMLQuantizationType.F32 if wanted == "f32" else ggml_type)
        fmt, _ = resolve_format(as_format(wanted), array.shape[-1])
        return gguf_quantize(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), fmt)

    # export_gguf reports a fallback only where the stored type differs from this
    quantize.planned = {name: fmt if fmt == "f32" else fmt.ggml_type.lower() for name, fmt in formats.items()}
    return quantize
