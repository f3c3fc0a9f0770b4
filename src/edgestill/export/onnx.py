"""Write a transformers model as an ONNX graph with quantized weights that onnxruntime runs on CPU.

How: torch.onnx's exporter (dynamo, opset 21) writes the float graph, where every nn.Linear becomes
`MatMul(x, Wᵀ)` with Wᵀ a constant. Each quantized Linear's constant is then found *by value* (not
by a name the exporter may change) and its MatMul is rewritten to consume the quantized bytes:

    format (edgestill.quant)          ONNX                                      stored
    Int4Block (`int4`)                com.microsoft MatMulNBits, bits 4         4-bit codes + fp32 scale / block
    GGUFQ4_0 (`q4_0`)                 MatMulNBits, bits 4, block 32, zp 8       the Q4_0 codes and scales, exactly
    GGUFQ8_0 (`q8_0`)                 MatMulNBits, bits 8, block 32, zp 128     the Q8_0 codes and scales, exactly
    Int8PerChannel (`int8`)           DequantizeLinear(axis 0) -> Transpose -> MatMul   int8 + fp32 scale / row

An embedding table listed in `formats` (an nn.Embedding: a classifier's token table, or the small table of a
factorized one) is stored the same way and read by a Gather of the packed rows that dequantizes only the rows
it looks up. A tied embedding (SmolLM2's token table is also its head) is stored once: the head reads the
quantized table through MatMulNBits/DequantizeLinear, and the token lookup gathers the same bytes
and dequantizes only the rows it needs. GGUF formats with a minimum or a super-block (Q4_1, Q5_x,
Q4_K) have no exact ONNX op and are refused with the formats that work.

Every packed tensor is dequantized again in numpy and compared with the model's weight bit for
bit before the file is written: a file that loads but computes something else is never written.

The graph is one full forward pass, `input_ids (batch, seq) -> logits (batch, seq, vocab)` for a
causal LM (no KV cache: generation re-runs the prefix), or whatever inputs an encoder takes.

    report = export_onnx(student, "runs/a/onnx/model.onnx", formats={"lm_head": GGUFQ4_0(), ...})

Running the file (onnxruntime sessions, logits, latency) is `edgestill.runtime.onnx`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgestill.errors import EdgestillError

__all__ = ["OnnxExportReport", "copy_tokenizer", "export_onnx", "onnx_types"]

def onnx_types() -> tuple[str, ...]:
    """What `edgestill export --format onnx --type` accepts: f32, and the registry's formats with an exact ONNX op."""
    from edgestill.quant.formats import format_names

    return ("f32", *format_names(onnx=True))


OPSET = 21


@dataclass
class OnnxExportReport:
    path: Path
    file_bytes: int
    formats: dict[str, str] = field(default_factory=dict)  # module name -> format stored
    float_matmuls: int = 0  # MatMuls with a float constant left (unplanned Linears)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "file_bytes": self.file_bytes, "formats": self.formats,
                "float_matmuls": self.float_matmuls}


# --- packing: a weight (N, K) -> the op's inputs, and back ------------------------------------------

@dataclass
class _NBits:
    """MatMulNBits inputs: B uint8 (N, k_blocks, block_size*bits/8), scales fp32 (N, k_blocks), zero points."""

    bits: int
    block_size: int
    B: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None  # packed uint8 (4-bit: two per byte), None = the op's default (8 / 128)
    K: int

    def codes(self) -> np.ndarray:
        """Unpacked codes (N, k_blocks, block_size) uint8."""
        if self.bits == 8:
            return self.B
        lo, hi = self.B & 0x0F, self.B >> 4
        return np.stack([lo, hi], axis=-1).reshape(*self.B.shape[:2], -1)

    def dequantize(self) -> np.ndarray:
        n, k_blocks = self.scales.shape
        if self.zero_points is None:
            zp = np.full((n, k_blocks), 1 << (self.bits - 1), dtype=np.float32)
        else:  # 4-bit zero points, two a byte, low nibble first
            zp = np.stack([self.zero_points & 0x0F, self.zero_points >> 4], axis=-1).reshape(n, -1)[:, :k_blocks]
            zp = zp.astype(np.float32)
        w = (self.codes().astype(np.float32) - zp[..., None]) * self.scales[..., None]  # (N, k_blocks, bs)
        return w.reshape(n, -1)[:, : self.K]


@dataclass
class _Int8Rows:
    """int8 codes (N, K) with one fp32 scale per row (ONNX DequantizeLinear, axis 0)."""

    q: np.ndarray
    scale: np.ndarray

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.scale[:, None]


def _pack(weight: np.ndarray, fmt) -> _NBits | _Int8Rows:
    """The exact ONNX representation of `weight` (already holding the format's dequantized values)."""
    import torch

    from edgestill.quant.formats import GGUFQ4_0, GGUFQ8_0, Int4Block, Int8PerChannel, format_names, gguf_quantize, \
        int8_per_channel_codes, pack_matmul_nbits

    w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
    n, k = w.shape
    if isinstance(fmt, Int8PerChannel):
        q, scale = int8_per_channel_codes(w)
        return _Int8Rows(q.numpy(), scale.numpy().astype(np.float32))
    if isinstance(fmt, Int4Block):
        p = pack_matmul_nbits(w, fmt)
        return _NBits(4, fmt.block_size, p["B"], p["scales"].astype(np.float32), p["zero_points"], k)
    if isinstance(fmt, (GGUFQ4_0, GGUFQ8_0)):
        if k % 32:
            raise EdgestillError(f"{fmt.ggml_type} needs rows that are a multiple of 32 weights, this one has {k}")
        data, _ = gguf_quantize(w, fmt)
        blocks = np.asarray(data, dtype=np.uint8).reshape(n, k // 32, -1)  # (N, k_blocks, type_size)
        scales = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, k_blocks)
        body = blocks[..., 2:]
        if isinstance(fmt, GGUFQ8_0):  # int8 codes; MatMulNBits' 8-bit codes are unsigned with zero point 128
            codes = (body.view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # (N, k_blocks, 32)
            return _NBits(8, 32, codes, scales, None, k)
        # Q4_0 stores weights j and j+16 of a block in byte j (low, high nibble); MatMulNBits wants
        # weights 2i and 2i+1 in byte i.
        codes = np.concatenate([body & 0x0F, body >> 4], axis=-1)  # (N, k_blocks, 32), in weight order
        packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
        return _NBits(4, 32, packed.astype(np.uint8), scales, None, k)
    raise EdgestillError(
        f"{type(fmt).__name__} has no exact ONNX operator; for ONNX quantize with one of "
        f"{', '.join(format_names(onnx=True))} (GGUF {'/'.join(format_names(onnx=False, gguf=True, quantized=True))} "
        "stay GGUF-only)")


# --- graph surgery --------------------------------------------------------------------------------

def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes() + str(array.shape).encode()).hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


class _Graph:
    """Small helpers over an onnx GraphProto: add initializers and nodes, find consumers."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self.numpy_helper = numpy_helper
        self.by_digest: dict[str, str] = {}
        for init in self.graph.initializer:
            self.by_digest.setdefault(_digest(numpy_helper.to_array(init)), init.name)

    def add_init(self, name: str, array: np.ndarray) -> str:
        self.graph.initializer.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, name: str, values, dtype=np.int64) -> str:
        return self.add_init(name, np.asarray(values, dtype=dtype))

    def consumers(self, tensor: str, op_type: str) -> list:
        return [n for n in self.graph.node if n.op_type == op_type and tensor in list(n.input)]

    def replace_node(self, old, new_nodes: list) -> None:
        nodes = list(self.graph.node)
        i = nodes.index(old)
        del self.graph.node[:]
        self.graph.node.extend(nodes[:i] + new_nodes + nodes[i + 1 :])

    def drop_unused_initializers(self) -> None:
        """Remove nodes nothing reads (e.g. the Transpose that fed a replaced MatMul), then unread initializers."""
        outputs = {o.name for o in self.graph.output}
        while True:
            read = {i for n in self.graph.node for i in n.input} | outputs
            live = [n for n in self.graph.node if any(o in read for o in n.output)]
            if len(live) == len(self.graph.node):
                break
            del self.graph.node[:]
            self.graph.node.extend(live)
        used = {i for n in self.graph.node for i in n.input} | outputs
        keep = [init for init in self.graph.initializer if init.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)


def _add_packed(g: _Graph, p: _NBits | _Int8Rows, prefix: str) -> list[str]:
    """Store the packed weight as initializers named after `prefix`: [codes, scales(, zero points)]."""
    if isinstance(p, _Int8Rows):
        return [g.add_init(prefix + "_q", p.q), g.add_init(prefix + "_scale", p.scale)]
    inputs = [g.add_init(prefix + "_B", p.B), g.add_init(prefix + "_scales", p.scales.reshape(-1))]
    if p.zero_points is not None:
        inputs.append(g.add_init(prefix + "_zp", p.zero_points.reshape(-1)))
    return inputs


def _matmul_nodes(g: _Graph, p: _NBits | _Int8Rows, prefix: str, x: str, y: str) -> list:
    """Nodes computing y = x @ Wᵀ from the packed weight (stored here as initializers named after `prefix`)."""
    from onnx import helper

    inputs = _add_packed(g, p, prefix)
    if isinstance(p, _Int8Rows):
        return [helper.make_node("DequantizeLinear", inputs, [prefix + "_w"], axis=0, name=prefix + "_dq"),
                helper.make_node("Transpose", [prefix + "_w"], [prefix + "_wt"], perm=[1, 0], name=prefix + "_t"),
                helper.make_node("MatMul", [x, prefix + "_wt"], [y], name=prefix + "_matmul")]
    return [helper.make_node("MatMulNBits", [x, *inputs], [y], domain="com.microsoft", K=p.K, N=p.scales.shape[0],
                             bits=p.bits, block_size=p.block_size, name=prefix + "_matmulnbits")]


def _gather_nodes(g: _Graph, p: _NBits | _Int8Rows, prefix: str, ids: str, y: str, tag: str = "") -> list:
    """Nodes computing y = W[ids] (ids of any rank) from the packed table (initializers named after `prefix`),
    dequantizing only those rows; `tag` tells apart the nodes of a second lookup of the same table."""
    from onnx import TensorProto, helper

    nodes, own = [], prefix + tag

    def node(op, inputs, outputs=None, **attrs):
        out = outputs or [f"{own}_{op.lower()}_{len(nodes)}"]
        nodes.append(helper.make_node(op, inputs, out, name=f"{own}_{op}_{len(nodes)}", **attrs))
        return out[0]

    if isinstance(p, _Int8Rows):
        rows = node("Gather", [prefix + "_q", ids], axis=0)  # (..., K) int8
        scale = node("Gather", [prefix + "_scale", ids], axis=0)  # (...)
        scale = node("Unsqueeze", [scale, g.const(own + "_axis_last", [-1])])
        node("Mul", [node("Cast", [rows], to=TensorProto.FLOAT), scale], [y])
        return nodes
    if p.zero_points is not None:
        raise EdgestillError("a token embedding in asymmetric int4 has no ONNX export yet; use symmetric Int4Block")
    n, k_blocks = p.scales.shape
    codes = node("Gather", [prefix + "_B", ids], axis=0)  # (..., k_blocks, bytes per block) uint8
    if p.bits == 4:
        lo = node("BitwiseAnd", [codes, g.const(own + "_mask", 15, np.uint8)])
        hi = node("BitShift", [codes, g.const(own + "_four", 4, np.uint8)], direction="RIGHT")
        axis = g.const(own + "_axis_last", [-1])
        codes = node("Concat", [node("Unsqueeze", [lo, axis]), node("Unsqueeze", [hi, axis])], axis=-1)
        # (..., k_blocks, bs/2, 2): weight 2i of a block is byte i's low nibble, 2i+1 its high nibble
    blocks_shape = g.const(own + "_blocks_shape", [-1, k_blocks, p.block_size])
    codes = node("Reshape", [codes, blocks_shape])  # (rows, k_blocks, bs)
    zero = float(1 << (p.bits - 1))
    values = node("Sub", [node("Cast", [codes], to=TensorProto.FLOAT), g.const(own + "_zp_const", zero, np.float32)])
    table = node("Reshape", [prefix + "_scales", g.const(own + "_table_shape", [n, k_blocks])])  # shared with the head
    scale = node("Gather", [table, ids], axis=0)  # (..., k_blocks)
    scale = node("Reshape", [scale, g.const(own + "_scale_shape", [-1, k_blocks, 1])])  # (rows, k_blocks, 1)
    values = node("Mul", [values, scale])
    # back to the ids' shape + (K,): shape(ids) ++ [k_blocks * bs], then drop a padded last block
    ids_shape = node("Shape", [ids])
    flat = node("Reshape", [values, node("Concat", [ids_shape, g.const(own + "_row", [k_blocks * p.block_size])], axis=0)])
    if k_blocks * p.block_size != p.K:
        flat = node("Slice", [flat, g.const(own + "_s0", [0]), g.const(own + "_s1", [p.K]), g.const(own + "_ax", [-1])])
    node("Identity", [flat], [y])
    return nodes


# --- the export --------------------------------------------------------------------------------------

class _Forward:
    """Wraps a HF model so the exported graph takes named tensors and returns one logits tensor."""

    def __init__(self, model, input_names):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *tensors):
                kwargs = dict(zip(input_names, tensors))
                if getattr(self.model.config, "is_decoder", False) or hasattr(self.model, "generate"):
                    kwargs.setdefault("use_cache", False)
                return self.model(**kwargs).logits

        self.module = Wrapper().eval()


def _planned_modules(model, formats: dict) -> dict[str, tuple[object, object]]:
    """module name -> (nn.Linear or nn.Embedding, format); every name must exist."""
    from torch import nn

    modules = dict(model.named_modules())
    out = {}
    for name, fmt in formats.items():
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise EdgestillError(f"ONNX export: '{name}' is not a Linear or an Embedding of this model")
        out[name] = (module, fmt)
    return out


def export_onnx(model, path, formats: dict | None = None, example_inputs: dict | None = None,
                opset: int = OPSET) -> OnnxExportReport:
    """Export `model` (a transformers model whose output has `.logits`) to `path`, quantized per `formats`.

    formats: Linear (or Embedding) module name -> edgestill.quant format (Int8PerChannel, Int4Block, GGUFQ4_0,
      GGUFQ8_0). The file computes with `fmt.fake_quant(weight)`, exactly; a model converted by
      `quantize_` already holds those values and they pass through unchanged (re-quantizing them is
      exact for every symmetric format). Unlisted Linears stay fp32.
    example_inputs: name -> (batch, seq) tensor used to trace; default `input_ids` of shape (2, 8).
      Batch and sequence length stay dynamic in the graph.
    The file appears atomically; `path`'s folder is created.
    """
    import onnx
    import torch

    path = Path(path)
    formats = dict(formats or {})
    model = copy.deepcopy(model).float().eval()
    planned = _planned_modules(model, formats)
    if example_inputs is None:
        vocab = model.config.vocab_size
        example_inputs = {"input_ids": torch.arange(16).reshape(2, 8) % vocab}
    names = list(example_inputs)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=1, max=1 << 16)
    dynamic = {n: {0: batch, 1: seq} for n in names}
    wrapper = _Forward(model, names).module

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-export-") as tmp:
        raw = Path(tmp) / "float.onnx"
        try:
            with torch.no_grad():
                torch.onnx.export(wrapper, tuple(example_inputs.values()), str(raw), input_names=names,
                                  output_names=["logits"], dynamo=True, opset_version=opset,
                                  dynamic_shapes={"tensors": tuple(dynamic[n] for n in names)}, verbose=False)
        except Exception as e:
            arch = getattr(model.config, "model_type", type(model).__name__)
            raise EdgestillError(f"torch.onnx could not export architecture '{arch}' "
                                 f"({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from None
        proto = onnx.load(str(raw))
        report_formats = _quantize_graph(proto, model, planned)
        float_matmuls = _count_float_matmuls(proto)
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        proto.metadata_props.append(onnx.StringStringEntryProto(key="edgestill.formats", value=json.dumps(report_formats)))
        onnx.checker.check_model(proto)
        staged = Path(tmp) / "model.onnx"
        onnx.save_model(proto, str(staged))
        os.replace(staged, path)
    return OnnxExportReport(path, path.stat().st_size, report_formats, float_matmuls)


def _quantize_graph(proto, model, planned: dict) -> dict[str, str]:
    """Rewrite each planned Linear's MatMul (and a tied embedding's Gather), and each planned Embedding's Gather,
    onto packed weights."""
    g = _Graph(proto)
    stored: dict[str, str] = {}
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, (module, fmt) in planned.items():
        weight = module.weight.detach().float().numpy()  # (N, K): float, or a converted model's quantized values
        packed = _pack(weight, fmt)
        if not np.array_equal(packed.dequantize(), fmt.fake_quant(module.weight.detach().float()).numpy()):
            raise EdgestillError(f"ONNX packing of '{name}' in {type(fmt).__name__} does not reproduce its weights; "
                                 "not writing a file that computes something else (this is a bug, please report it)")
        prefix = _safe(name)
        if not hasattr(module, "in_features"):  # an nn.Embedding: its lookups gather the packed rows
            table = g.by_digest.get(_digest(weight))
            gathers = [n for n in (g.consumers(table, "Gather") if table else []) if n.input[0] == table]
            if not gathers:
                raise EdgestillError(f"ONNX export: no Gather reads the table of '{name}' (exporter layout changed?)")
            _add_packed(g, packed, prefix)
            for i, gather in enumerate(gathers):  # every lookup reads the one packed table
                g.replace_node(gather, _gather_nodes(g, packed, prefix, gather.input[1], gather.output[0],
                                                     tag=f"_{i}" if i else ""))
            stored[name] = _stored_name(fmt)
            continue
        const = g.by_digest.get(_digest(np.ascontiguousarray(weight.T)))
        matmuls = g.consumers(const, "MatMul") if const else []
        if not matmuls:  # a weight shared with a Gather stays (N, K) and reaches MatMul through a Transpose
            table = g.by_digest.get(_digest(weight))
            for t in g.consumers(table, "Transpose") if table else []:
                matmuls += g.consumers(t.output[0], "MatMul")
        if not matmuls:
            raise EdgestillError(f"ONNX export: no MatMul reads the weight of '{name}' (exporter layout changed?)")
        for i, mm in enumerate(matmuls):
            nodes = _matmul_nodes(g, packed, prefix if i == 0 else f"{prefix}_{i}", mm.input[0], mm.output[0])
            g.replace_node(mm, nodes)
        stored[name] = _stored_name(fmt)
        # A tied embedding shares this table: gather from the packed bytes instead of a float copy.
        if embedding is not None and embedding.weight is module.weight:
            table = g.by_digest.get(_digest(weight))
            for gather in g.consumers(table, "Gather") if table else []:
                if gather.input[0] == table:
                    g.replace_node(gather, _gather_nodes(g, packed, prefix, gather.input[1], gather.output[0]))
                    stored[_module_name(model, embedding)] = stored[name] + " (tied)"
    g.drop_unused_initializers()
    return stored


def _stored_name(fmt) -> str:
    """'Int8PerChannel', 'Int4Block(block_size=32)': a format as the report names it."""
    from edgestill.quant.formats import format_to_dict

    d = format_to_dict(fmt)
    return d["format"] + ("" if "block_size" not in d else f"(block_size={d['block_size']})")


def _module_name(model, target) -> str:
    return next((n for n, m in model.named_modules() if m is target), "embeddings")


def _count_float_matmuls(proto) -> int:
    inits = {i.name for i in proto.graph.initializer}
    return sum(1 for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits)


def copy_tokenizer(tokenizer, folder: Path) -> None:
    """Tokenizer files next to the ONNX model (written to a temp folder first)."""
    tmp = folder / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, folder / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
