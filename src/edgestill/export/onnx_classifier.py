"""Export an encoder classifier (edgestill's teacher or student) to ONNX (run and timed by edgestill.runtime.onnx).

What is written, in one folder:

    model.onnx            input_ids, attention_mask (batch, seq) int64 -> logits (batch, num_labels)
    tokenizer files       the model's own tokenizer (a student's trimmed one)
    label_map.json        id -> label string (the same file the PyTorch model was saved with)
    export_report.json    type, max_len, file bytes, quantized weights, parity against PyTorch

How: `edgestill.export.onnx.export_onnx` does the export and the weight quantization. It quantizes
nn.Linear modules only, so a student's low-rank layers are first rewritten into plain Linears that
compute the same thing (`linearize_`):

    LowRankLinear (x Vᵀ) Uᵀ + b          -> Sequential(Linear(in, r, no bias), Linear(r, out))
    FactorizedEmbedding table[ids] @ P   -> Embedding(vocab, E) then Linear(E, hidden, no bias)

so with `--type int8|int4` both factors of every low-rank layer are stored quantized (Int8PerChannel:
DequantizeLinear; Int4Block: MatMulNBits), and so is the token table (a factorized embedding's small
table, or a whole one): a Gather of its packed rows, dequantized after the lookup. The classification
head stays fp32 (a few hundred numbers that decide every prediction), and so do the position and
token-type tables (a few thousand numbers). The exporter's per-node debug
metadata (stack traces) is stripped: it does not change the graph and would dominate a small file.

The sequence length is capped at `max_len` (a student's position table has only that many rows):
`edgestill.runtime.onnx.predict_onnx` truncates to it, as the PyTorch evaluation does.

    report = export_classifier_onnx("runs/s/student", "runs/s/onnx", "int8", parity_texts=test_texts)
    labels = predict_onnx("runs/s/onnx", ["free money!!!", "meeting at 10"])   # edgestill.runtime.onnx
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from edgestill.data.labelled import LABEL_MAP_FILE
from edgestill.errors import EdgestillError
from edgestill.files import atomic_path, write_text_atomic
from edgestill.quant.formats import format_names
from edgestill.runtime.onnx import REPORT_FILE

log = logging.getLogger(__name__)

CLASSIFIER_TYPES = ("f32", *format_names(onnx=True, gguf=False))  # float, or ONNX Runtime's own formats: f32, int8, int4
KEEP_FLOAT = ("classifier",)  # module-name prefixes never quantized


class _EmbeddingThenLinear(nn.Module):
    """table[ids] @ proj written as Embedding + Linear, so the projection is a quantizable nn.Linear."""

    def __init__(self, table: torch.Tensor, proj: torch.Tensor, padding_idx: int | None):
        super().__init__()
        vocab, rank = table.shape
        hidden = proj.shape[1]
        self.lookup = nn.Embedding(vocab, rank, padding_idx=padding_idx)
        self.proj = nn.Linear(rank, hidden, bias=False)
        with torch.no_grad():
            self.lookup.weight.copy_(table)  # (vocab, E)
            self.proj.weight.copy_(proj.T)  # (hidden, E)

    @property
    def weight(self) -> torch.Tensor:  # what code asking for an embedding's table expects
        return self.lookup.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.lookup(input_ids))  # (B, T) -> (B, T, E) -> (B, T, hidden)


class _SequencePooler(nn.Module):
    """BERT's pooler (tanh(dense(h[:, 0]))) applied to h[:, :1]: a 3-D input, so the exporter writes the dense
    layer as MatMul + Add (which export_onnx can quantize) instead of Gemm. Same numbers."""

    def __init__(self, pooler: nn.Module):
        super().__init__()
        self.dense, self.activation = pooler.dense, pooler.activation

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, :1])).squeeze(1)  # (B, T, C) -> (B, 1, C) -> (B, C)


@torch.no_grad()
def linearize_(model: nn.Module) -> dict[str, str]:
    """Rewrite LowRankLinear / FactorizedEmbedding modules into nn.Linear-based ones in place (same function),
    and a BERT-style pooler into one whose dense layer sees a 3-D input.

    Returns {module name: what it became}.
    """
    from edgestill.models.lowrank import FactorizedEmbedding, LowRankLinear, set_module

    changed = {}
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("Pooler") and hasattr(module, "dense") and hasattr(module, "activation"):
            set_module(model, name, _SequencePooler(module))
            changed[name] = "pooler on a 3-D input"
        if isinstance(module, LowRankLinear):
            first = nn.Linear(module.in_features, module.rank, bias=False)
            second = nn.Linear(module.rank, module.out_features, bias=module.bias is not None)
            first.weight.copy_(module.V)  # (r, in)
            second.weight.copy_(module.U)  # (out, r)
            if module.bias is not None:
                second.bias.copy_(module.bias)
            set_module(model, name, nn.Sequential(first, second).to(module.U.dtype))
            changed[name] = f"Linear({module.in_features}->{module.rank}) + Linear({module.rank}->{module.out_features})"
        elif isinstance(module, FactorizedEmbedding):
            set_module(model, name, _EmbeddingThenLinear(module.table, module.proj, module.padding_idx).to(module.table.dtype))
            changed[name] = f"Embedding({module.num_embeddings}, {module.rank}) + Linear({module.rank}->{module.embedding_dim})"
    return changed


def quant_formats(model: nn.Module, tensor_type: str) -> dict[str, object]:
    """Module name -> format for `--type` (f32: none): every Linear and the token table; the head stays float."""
    if tensor_type not in CLASSIFIER_TYPES:
        raise EdgestillError(f"ONNX classifier export --type '{tensor_type}': choose one of {', '.join(CLASSIFIER_TYPES)}")
    if tensor_type == "f32":
        return {}
    from edgestill.quant.formats import format_by_name

    fmt = format_by_name(tensor_type)
    token_table = model.get_input_embeddings()
    token_table = getattr(token_table, "lookup", token_table)  # a factorized table: its (vocab, E) lookup
    return {name: fmt for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) and fmt.supports(m.in_features) or m is token_table and fmt.supports(m.embedding_dim))
            and not any(name == p or name.startswith(p + ".") for p in KEEP_FLOAT)}


@torch.no_grad()
def fake_quant_reference(model: nn.Module, formats: dict) -> nn.Module:
    """A copy of (linearized) `model` whose planned weights hold the values the ONNX file computes with."""
    ref = copy.deepcopy(model).float().eval()
    modules = dict(ref.named_modules())
    for name, fmt in formats.items():
        modules[name].weight.copy_(fmt.fake_quant(modules[name].weight))
    return ref


def _example_inputs(model, max_len: int) -> dict[str, torch.Tensor]:
    seq = max(2, min(8, max_len))
    ids = torch.arange(2 * seq).reshape(2, seq) % model.config.vocab_size  # (2, seq)
    mask = torch.ones_like(ids)
    mask[1, seq // 2:] = 0  # a padded row, so the mask path is traced
    return {"input_ids": ids, "attention_mask": mask}


def strip_debug_metadata(path: Path) -> int:
    """Drop the exporter's per-node debug metadata (stack traces, module paths) from an ONNX file, in place.

    They do not change what the graph computes, but for a small student they can outweigh the weights
    (a few hundred bytes per node). Returns the bytes saved.
    """
    import onnx

    path = Path(path)
    before = path.stat().st_size
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for info in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output):
        del info.metadata_props[:]
    onnx.checker.check_model(proto)
    with atomic_path(path, "writing the ONNX classifier") as tmp:
        onnx.save_model(proto, str(tmp))
    return before - path.stat().st_size


def copy_classifier_files(src: Path, dst: Path) -> None:
    """Tokenizer files and label_map.json from a saved classifier folder to the export folder."""
    from transformers import AutoTokenizer

    from edgestill.export.onnx import copy_tokenizer

    copy_tokenizer(AutoTokenizer.from_pretrained(src), dst)
    with atomic_path(dst / LABEL_MAP_FILE) as tmp:
        shutil.copyfile(Path(src) / LABEL_MAP_FILE, tmp)


def export_classifier_onnx(model_dir: str | Path, out_dir: str | Path, tensor_type: str = "f32",
                           parity_texts: list[str] | None = None, max_len: int | None = None, threads: int = 2) -> dict:
    """Export the classifier saved in `model_dir` (HF folder + label_map.json) to `out_dir`/model.onnx.

    With `parity_texts`, the file is run in onnxruntime on them and its predictions are compared with
    the PyTorch model's (the fake-quantized copy for int8/int4): `parity_vs_pytorch` in the report.
    Returns the report (also written as export_report.json).
    """
    from edgestill.evaluate.classification import classifier_parity
    from edgestill.export.onnx import export_onnx
    from edgestill.models.encoder import load_encoder_classifier

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model, tokenizer, label_map = load_encoder_classifier(str(model_dir))
    max_len = int(max_len or model.config.max_position_embeddings)
    if max_len > model.config.max_position_embeddings:
        raise EdgestillError(f"max_len {max_len} exceeds the model's {model.config.max_position_embeddings} positions")
    model = model.float().eval()
    rewritten = linearize_(model)
    formats = quant_formats(model, tensor_type)
    report = export_onnx(model, out_dir / "model.onnx", formats, example_inputs=_example_inputs(model, max_len))
    strip_debug_metadata(report.path)
    report.file_bytes = report.path.stat().st_size
    copy_classifier_files(model_dir, out_dir)
    result = {**report.to_dict(), "type": tensor_type, "max_len": max_len, "labels": list(label_map.labels),
              "source": str(model_dir), "low_rank_rewritten": len(rewritten), "inputs": ["input_ids", "attention_mask"]}
    if parity_texts:
        reference = fake_quant_reference(model, formats)
        result["parity_vs_pytorch"] = classifier_parity(reference, out_dir / "model.onnx", tokenizer, parity_texts, max_len,
                                                        threads)
    write_text_atomic(out_dir / REPORT_FILE, json.dumps(result, indent=1, default=str) + "\n")
    return result


__all__ = ["CLASSIFIER_TYPES", "linearize_", "quant_formats", "fake_quant_reference", "export_classifier_onnx"]
