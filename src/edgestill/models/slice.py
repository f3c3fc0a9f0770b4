"""Slice a student out of a decoder teacher: a subset of its layers, optionally narrower widths.

MLFS (docs/references.md [9]) found that decoders resist compression unless the student is
initialised by slicing the teacher; this module does that slicing. The student is a real,
smaller model of the same class: its config has fewer layers / a smaller `intermediate_size`
(and, width-pruned by models/width.py, a smaller hidden size and fewer heads) and its weight
tensors are physically smaller, so its saved file has fewer bytes.

Layer choice by block influence follows ShortGPT (Men et al., 2024, arXiv:2403.03853):
BI_i = 1 - E_tokens[cos(h_i, h_{i+1})], the layers that change the residual stream least are
dropped first. First and last layers are always kept (they carry the embedding/head interface).
"""

from __future__ import annotations

import copy
import logging
import re

import torch
from torch import nn

from edgestill.errors import EdgestillError
from edgestill.models.width import check_widths, ffn_weight_score, prune_width, resolve_importance

log = logging.getLogger("edgestill")


def decoder_layers(model) -> nn.ModuleList:
    """The list of transformer blocks of a Llama-style causal LM (Llama, Mistral, Qwen2, SmolLM...)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise EdgestillError(
            f"slicing supports Llama-style decoders (model.model.layers); {type(model).__name__} is not one. "
            "Pass an existing student with student.model instead"
        )
    return layers


def factorize_decoder_(model, keep: float, min_rank: int = 8, multiple_of: int = 8) -> dict:
    """student.low_rank: every nn.Linear of the decoder blocks as U·V (SVD-initialised, models/lowrank.py), in place.

    Ranks are chosen over all the blocks' matrices at once (greedy on singular-value energy per stored parameter)
    so that they store `keep` of their dense parameters; the embedding/head and the norms are left as they are.
    A matrix the budget would keep at nearly full rank stays dense. Returns the rank plan (also in model.config).
    """
    from edgestill.models.lowrank import LowRankConfig, factorize_

    blocks = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is blocks)
    linears = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith(prefix + ".")]
    if not linears:
        raise EdgestillError("student.low_rank: the decoder blocks hold no nn.Linear to factorize")
    dense = sum(m.weight.numel() for m in linears)
    budget = count_params(model) - dense + int(keep * dense)
    cfg = LowRankConfig(target_params=budget, targets=(f"re:{re.escape(prefix)}\\.\\d+\\..*",), skip=(), embeddings=(),
                        min_rank=min_rank, multiple_of=multiple_of)
    return factorize_(model, cfg)


def count_params(model) -> int:
    """Unique parameters (tied embedding/head counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def block_influence(model, batches: list[torch.Tensor]) -> list[float]:
    """ShortGPT block influence of every layer, averaged over the tokens of `batches`."""
    n = len(decoder_layers(model))
    total = torch.zeros(n, dtype=torch.float64)
    count = 0
    for input_ids in batches:
        hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states  # n+1 x (B, T, C)
        for i in range(n):
            # hidden_states[n] has the final norm applied; compare pre-norm states where possible.
            cos = torch.nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)  # (B, T)
            total[i] += (1 - cos).double().sum()
        count += input_ids.numel()
    return (total / max(count, 1)).tolist()


def choose_layers(num_teacher_layers: int, num_layers: int, scores: list[float] | None = None) -> list[int]:
    """Pick `num_layers` layer indices: the highest-scoring ones (first and last always), else evenly spaced."""
    if num_layers >= num_teacher_layers:
        return list(range(num_teacher_layers))
    if num_layers == 1:
        return [num_teacher_layers - 1]
    if scores is None:
        step = (num_teacher_layers - 1) / (num_layers - 1)
        return sorted({round(i * step) for i in range(num_layers)})
    keep = {0, num_teacher_layers - 1}
    for i in sorted(range(num_teacher_layers), key=lambda i: -scores[i]):
        if len(keep) >= num_layers:
            break
        keep.add(i)
    return sorted(keep)


def _ffn_keep(mlp, size: int) -> torch.Tensor:
    """Indices of the FFN units to keep: largest ||gate_j|| * ||up_j|| * ||down_:,j||."""
    return torch.topk(ffn_weight_score(mlp), size).indices.sort().values


def narrow_ffn(mlp, keep: torch.Tensor) -> None:
    """Keep FFN units `keep` (sorted indices) of a gated MLP (gate_proj, up_proj, down_proj), in place."""
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        new = nn.Linear(old.in_features, len(keep), bias=old.bias is not None, dtype=old.weight.dtype)
        new.weight.data.copy_(old.weight.data[keep])
        if old.bias is not None:
            new.bias.data.copy_(old.bias.data[keep])
        setattr(mlp, name, new)
    old = mlp.down_proj
    new = nn.Linear(len(keep), old.out_features, bias=old.bias is not None, dtype=old.weight.dtype)
    new.weight.data.copy_(old.weight.data[:, keep])
    if old.bias is not None:
        new.bias.data.copy_(old.bias.data)
    mlp.down_proj = new
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


def slice_decoder(teacher, layers: list[int], intermediate_size: int | None = None, allow_full: bool = False):
    """A new model of the teacher's class holding only `layers`, FFNs narrowed to `intermediate_size`.

    Weights are copied (the teacher is left untouched). Raises if the result would not be smaller,
    unless `allow_full` (a full-size copy that quantization-aware training will shrink).
    """
    teacher_layers = decoder_layers(teacher)
    n = len(teacher_layers)
    if not layers or any(i < 0 or i >= n for i in layers) or len(set(layers)) != len(layers):
        raise EdgestillError(f"student.layers={layers} must be distinct indices in 0..{n - 1}")
    cfg = copy.deepcopy(teacher.config)
    teacher_ffn = getattr(cfg, "intermediate_size", None)
    if intermediate_size is not None:
        if teacher_ffn is None:
            raise EdgestillError(f"{type(teacher).__name__} has no intermediate_size to narrow; leave student.intermediate_size unset")
        if not 1 <= intermediate_size <= teacher_ffn:
            raise EdgestillError(f"student.intermediate_size={intermediate_size} must be between 1 and the teacher's {teacher_ffn}")
    if len(layers) == n and intermediate_size in (None, teacher_ffn) and not allow_full:
        raise EdgestillError(
            f"the student would be as large as the teacher ({n} of {n} layers, full width): nothing to shrink; "
            "set student.num_layers below the teacher's depth or a smaller student.intermediate_size"
        )

    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    student = type(teacher)(cfg).to(next(teacher.parameters()).dtype)
    student_layers = decoder_layers(student)
    for new_idx, old_idx in enumerate(layers):
        block = copy.deepcopy(teacher_layers[old_idx])
        attn = getattr(block, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx  # the KV cache is indexed by position in the student
        student_layers[new_idx] = block
    # Everything outside the blocks (embeddings, final norm, head) is copied by name.
    block_prefix = "model.layers."
    own = {k: v for k, v in teacher.state_dict().items() if not k.startswith(block_prefix)}
    missing, unexpected = student.load_state_dict(own, strict=False)
    missing = [k for k in missing if not k.startswith(block_prefix) and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise EdgestillError(f"slicing {type(teacher).__name__} left weights unset: {missing[:3]} {unexpected[:3]}")
    if intermediate_size is not None and intermediate_size != teacher_ffn:
        for block in student_layers:
            narrow_ffn(block.mlp, _ffn_keep(block.mlp, intermediate_size))
        student.config.intermediate_size = intermediate_size
    if getattr(student.config, "tie_word_embeddings", False):
        student.tie_weights()
    student.eval()
    if count_params(student) >= count_params(teacher) and not allow_full:
        raise EdgestillError("the sliced student is not smaller than the teacher; use fewer layers or a narrower FFN")
    return student


def slice_student(student_cfg, teacher, layers: list[int], calibration: list[torch.Tensor], allow_full: bool = False):
    """The student `student_cfg` (a config.StudentConfig) describes, cut from `teacher`: `layers`, then its widths.

    An FFN-only cut ranked by weight norms (student.width_importance=weight, no hidden size or head count) is
    slice_decoder's; any other width cut is models/width.py's, on the sliced layers, ranked on `calibration` when
    the importance is activation (`auto`).
    """
    s = student_cfg
    hidden_or_heads = (s.hidden_size, s.num_attention_heads, s.num_key_value_heads)
    importance = resolve_importance(s.width_importance)
    if importance == "weight" and all(w is None for w in hidden_or_heads):
        return slice_decoder(teacher, layers, s.intermediate_size, allow_full)
    check_widths(teacher.config, *hidden_or_heads, s.intermediate_size)  # before any copy or forward pass
    student = prune_width(slice_decoder(teacher, layers, allow_full=True), calibration, *hidden_or_heads,
                          s.intermediate_size, importance=importance)
    if count_params(student) >= count_params(teacher) and not allow_full:
        raise EdgestillError("the width-pruned student is not smaller than the teacher; use fewer layers or smaller "
                             "widths (student.hidden_size, student.num_attention_heads, student.intermediate_size)")
    return student


def build_student(student_cfg, teacher, tokenizer, calibration: list[torch.Tensor], quantized: bool = False):
    """The student a config.StudentConfig describes: (model, teacher layers kept, or None for a given student).

    student_cfg.model names an existing student (same tokenizer, fewer parameters than the teacher); otherwise the
    teacher is sliced: `layers` if pinned, else `num_layers` chosen by block influence on `calibration` (or evenly),
    with optional narrower widths (slice_student). `quantized`: the student will train in a lower-bit format, so
    keeping every layer at full width is a real (QAT) student rather than a copy of the teacher.
    """
    from edgestill.models.load import check_same_tokenizer, load_causal_lm

    s = student_cfg
    if s.model:
        loaded = load_causal_lm(s.model)
        check_same_tokenizer(tokenizer, loaded.tokenizer)
        if s.low_rank is not None:
            factorize_decoder_(loaded.model, s.low_rank)
        if count_params(loaded.model) >= count_params(teacher):
            raise EdgestillError(
                f"student '{s.model}' has {count_params(loaded.model):,} parameters, not fewer than the teacher's "
                f"{count_params(teacher):,}: nothing would be shrunk; pick a smaller student"
            )
        return loaded.model, None
    n = len(decoder_layers(teacher))
    if s.layers is not None:
        layers = sorted(s.layers)
    else:
        widths = (s.intermediate_size, s.hidden_size, s.num_attention_heads, s.num_key_value_heads)
        if s.num_layers >= n and all(w is None for w in widths) and not quantized and s.low_rank is None:
            raise EdgestillError(
                f"student.num_layers={s.num_layers} keeps all {n} teacher layers at full width: the student would be as "
                "large as the teacher; set student.num_layers lower, a width smaller (student.intermediate_size, "
                "student.hidden_size, student.num_attention_heads), or quantize it (quant.format=q4_0: "
                "quantization-aware distillation of the whole teacher)"
            )
        scores = block_influence(teacher, calibration) if s.layer_selection == "block_influence" else None
        layers = choose_layers(n, min(s.num_layers, n), scores)
    student = slice_student(s, teacher, layers, calibration, allow_full=quantized or s.low_rank is not None)
    if s.low_rank is not None:
        plan = factorize_decoder_(student, s.low_rank)
        log.info("low-rank blocks: %d matrices factorized (ranks %d-%d), the blocks keep %.0f%% of their dense "
                 "parameters", len(plan["linear"]), min(plan["linear"].values(), default=0),
                 max(plan["linear"].values(), default=0), 100 * s.low_rank)
    c = student.config
    log.info("student: layers %s of %d, hidden %s, heads %s/%s KV, FFN %s -> %s params (teacher %s)", layers, n,
             c.hidden_size, c.num_attention_heads, getattr(c, "num_key_value_heads", None), c.intermediate_size,
             f"{count_params(student):,}", f"{count_params(teacher):,}")
    return student, layers
