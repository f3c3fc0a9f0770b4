"""Width pruning (Minitron): fewer hidden channels, attention heads and FFN units, ranked, then cut out.

Minitron (docs/references.md [minitron-width]) prunes a trained decoder along its widths and lets distillation
recover: every unit is ranked by the activations it produces on a little calibration text (forward passes only),
the least important ones are removed, and the tensors become physically smaller. Here:

- the importance of a unit: its magnitude a[b, t] at every token (|activation| for a channel or an FFN unit,
  the L2 norm over head_dim for a head), aggregated as the L2 norm over the positions of each calibration
  sequence, then the mean over sequences: mean_b sqrt(sum_t a[b, t]^2) (one of the batch/sequence
  aggregations the paper compares);
  - FFN unit j: act_fn(gate_j(x)) * up_j(x), the input of down_proj;
  - attention head h: its attention output before o_proj;
  - hidden (embedding) channel c: the output of every RMSNorm (each layer's two and the final one), summed.
- importance="weight" ranks the same units by weight norms instead, no text needed (`weight_scores`; for the
  FFN it is the ||gate_j|| ||up_j|| ||down_:,j|| that slice.py has always used for `intermediate_size`).

Grouped-query attention: query head h reads KV head h // (heads / kv_heads), in transformers and llama.cpp alike,
so every KV head of the student must serve the same number of query heads. The student keeps the
`num_key_value_heads` KV groups (a KV head and its query heads) of largest total head importance, and in each
kept group its `num_attention_heads / num_key_value_heads` most important query heads: whole groups can go,
query heads inside groups can go, or both. head_dim never changes (RoPE and the KV cache layout stay the
teacher's); the student's config states it explicitly, since hidden_size / num_attention_heads no longer equals it.

RMSNorm after a hidden cut averages x^2 over the kept channels only, so each normalised vector is scaled by
sqrt(C' sum_all / (C sum_kept)), which depends on the input. Like Minitron we keep the norm weights as they are
and let distillation recover (an untrained width-pruned student is the worse for it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from edgestill.errors import EdgestillError

IMPORTANCE = ("activation", "weight")


@dataclass
class WidthScores:
    """The importance of every unit a width cut can remove (larger: kept first)."""

    hidden: torch.Tensor  # (hidden_size,)
    heads: list[torch.Tensor]  # per layer: (num_attention_heads,)
    ffn: list[torch.Tensor]  # per layer: (intermediate_size,)


@dataclass
class WidthKeep:
    """The indices a cut keeps, ascending. heads[i] is grouped: KV head kv_heads[i][g] serves the g-th run of
    len(heads[i]) // len(kv_heads[i]) query heads."""

    hidden: torch.Tensor
    heads: list[torch.Tensor]
    kv_heads: list[torch.Tensor]
    ffn: list[torch.Tensor]


def head_dim(config) -> int:
    """The width of one attention head: the config's head_dim, else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _blocks(model) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(b, "self_attn") and hasattr(b, "mlp") for b in layers):
        raise EdgestillError(f"width pruning supports Llama-style decoders (model.model.layers with self_attn and mlp); "
                             f"{type(model).__name__} is not one: leave student.hidden_size and the head counts unset")
    return layers


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def resolve_importance(setting: str) -> str:
    """student.width_importance with `auto` resolved: activation (Minitron), for every cut.

    An FFN-only cut used to rank its units by weight norms under `auto`; on the default teacher that cut (half of
    each kept layer's FFN) started at held-out KL 14.7 against 6.1 by activations, and after the default training
    kept retention 0.090–0.103 against 0.377–0.383 over three seeds (benchmarks/levers.py, rows width and
    width_activation). `weight` still selects weight norms."""
    if setting == "auto":
        return "activation"
    if setting not in IMPORTANCE:
        raise EdgestillError(f"student.width_importance='{setting}' is unknown; use auto, activation or weight")
    return setting


def check_widths(config, hidden_size: int | None = None, num_attention_heads: int | None = None,
                 num_key_value_heads: int | None = None, intermediate_size: int | None = None) -> tuple[int, int, int, int]:
    """(hidden, heads, kv_heads, ffn) of the student, None filled in, or an EdgestillError naming the key to fix.

    num_key_value_heads unset keeps the teacher's KV heads (query heads go from every group); num_attention_heads
    unset keeps the teacher's query heads per KV head (whole groups go).
    """
    n_head, n_kv = config.num_attention_heads, _kv_heads(config)
    group = n_head // n_kv
    hidden = config.hidden_size if hidden_size is None else hidden_size
    kv = n_kv if num_key_value_heads is None else num_key_value_heads
    heads = kv * group if num_attention_heads is None else num_attention_heads
    ffn = config.intermediate_size if intermediate_size is None else intermediate_size
    for key, value, limit in (("hidden_size", hidden, config.hidden_size), ("num_key_value_heads", kv, n_kv),
                              ("num_attention_heads", heads, n_head), ("intermediate_size", ffn, config.intermediate_size)):
        if not 1 <= value <= limit:
            raise EdgestillError(f"student.{key}={value} must be between 1 and the teacher's {limit}")
    if hidden != config.hidden_size and hidden % heads:
        raise EdgestillError(f"student.hidden_size={hidden} is not a multiple of the student's {heads} attention heads: "
                             "transformers refuses such a Llama config (even with head_dim set); use a multiple of "
                             f"{heads}, e.g. {hidden // heads * heads or heads}")
    if heads % kv:
        raise EdgestillError(f"student.num_attention_heads={heads} is not a multiple of student.num_key_value_heads={kv}: "
                             "every KV head serves the same number of query heads (transformers and llama.cpp); "
                             f"use a multiple of {kv}")
    if heads // kv > group:
        raise EdgestillError(f"student.num_attention_heads={heads} over {kv} KV heads is {heads // kv} query heads per "
                             f"KV head, more than the teacher's {group}; use at most {kv * group} heads or more KV heads")
    return hidden, heads, kv, ffn


def _aggregate(per_token: torch.Tensor) -> torch.Tensor:
    """(B, T, U) per-token magnitudes -> (U,): the L2 norm over positions, summed over the B sequences."""
    return per_token.double().pow(2).sum(dim=1).sqrt().sum(dim=0)


def _adder(total: torch.Tensor, per_token=lambda x: x):
    """A forward (pre-)hook adding the aggregate of per_token(output, or else input) to `total`. It returns None:
    a hook that returned a value would replace the activation."""
    def hook(module, args, output=None):
        total.add_(_aggregate(per_token(args[0] if output is None else output)))
    return hook


@torch.no_grad()
def activation_scores(model, calibration: list[torch.Tensor]) -> WidthScores:
    """Minitron's activation importance of every hidden channel, head and FFN unit on `calibration` (token ids)."""
    blocks = _blocks(model)
    if not calibration:
        raise EdgestillError("activation importance needs calibration text; set student.width_importance=weight to "
                             "rank by weight norms instead")
    config = model.config
    n_head, d = config.num_attention_heads, head_dim(config)
    hidden = torch.zeros(config.hidden_size, dtype=torch.float64)
    heads = [torch.zeros(n_head, dtype=torch.float64) for _ in blocks]
    ffn = [torch.zeros(b.mlp.down_proj.in_features, dtype=torch.float64) for b in blocks]

    def per_head(x):  # o_proj's input (B, T, heads * d) -> (B, T, heads): each head's L2 norm over its d values
        return x.unflatten(-1, (n_head, d)).norm(dim=-1)

    norms = [norm for b in blocks for norm in (b.input_layernorm, b.post_attention_layernorm)] + [model.model.norm]
    hooks = [norm.register_forward_hook(_adder(hidden)) for norm in norms]
    for block, head_total, ffn_total in zip(blocks, heads, ffn):
        hooks.append(block.self_attn.o_proj.register_forward_pre_hook(_adder(head_total, per_head)))
        hooks.append(block.mlp.down_proj.register_forward_pre_hook(_adder(ffn_total)))  # act_fn(gate(x)) * up(x)
    training = model.training
    model.eval()
    try:
        for ids in calibration:
            model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    sequences = sum(ids.shape[0] for ids in calibration)
    return WidthScores(hidden / sequences, [h / sequences for h in heads], [f / sequences for f in ffn])


def ffn_weight_score(mlp) -> torch.Tensor:
    """||gate_j|| * ||up_j|| * ||down_:,j|| of every FFN unit j: how much it can read and write."""
    return mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)


def _sq(weight: torch.Tensor, dim) -> torch.Tensor:
    return weight.double().pow(2).sum(dim=dim)


@torch.no_grad()
def weight_scores(model) -> WidthScores:
    """Importance from weight norms alone (no text): a unit matters as much as it can read times what it can write.

    FFN unit: ffn_weight_score. Head h: ||W_q,h|| ||W_v,g(h)|| ||W_o[:, h]||. Hidden channel c: the norm of what
    is written into it (embedding column, o_proj and down_proj rows) times the norm of what reads it (the q/k/v/
    gate/up columns and the head, each scaled by its RMSNorm weight).
    """
    blocks = _blocks(model)
    config = model.config
    n_head, n_kv, d = config.num_attention_heads, _kv_heads(config), head_dim(config)
    written = _sq(model.get_input_embeddings().weight, 0)
    read = model.model.norm.weight.double() ** 2 * _sq(model.get_output_embeddings().weight, 0)
    heads, ffn = [], []
    for block in blocks:
        attn, mlp = block.self_attn, block.mlp
        q = _sq(attn.q_proj.weight.unflatten(0, (n_head, d)), (1, 2))
        v = _sq(attn.v_proj.weight.unflatten(0, (n_kv, d)), (1, 2)).repeat_interleave(n_head // n_kv)
        o = _sq(attn.o_proj.weight.unflatten(1, (n_head, d)), (0, 2))
        heads.append((q * v * o).sqrt())
        ffn.append(ffn_weight_score(mlp))
        written += _sq(attn.o_proj.weight, 1) + _sq(mlp.down_proj.weight, 1)
        g_attn, g_mlp = block.input_layernorm.weight.double() ** 2, block.post_attention_layernorm.weight.double() ** 2
        read += g_attn * sum(_sq(p.weight, 0) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        read += g_mlp * (_sq(mlp.gate_proj.weight, 0) + _sq(mlp.up_proj.weight, 0))
    return WidthScores((written * read).sqrt(), heads, ffn)


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ascending (all of them, in order, when k is the length)."""
    return torch.topk(score, k).indices.sort().values


def choose_heads(scores: torch.Tensor, n_kv: int, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads kept, KV heads kept): the kv_heads groups of largest total score, then in each of them its
    heads // kv_heads best query heads. Query head h is in group h // (len(scores) // n_kv)."""
    per_group = scores.reshape(n_kv, -1)  # row g: the scores of the query heads KV head g serves
    groups = _top(per_group.sum(dim=1), kv_heads)
    query = torch.cat([g * per_group.shape[1] + _top(per_group[g], heads // kv_heads) for g in groups.tolist()])
    return query, groups


def width_keep(scores: WidthScores, config, hidden_size: int | None = None, num_attention_heads: int | None = None,
               num_key_value_heads: int | None = None, intermediate_size: int | None = None) -> WidthKeep:
    """The units to keep: the most important ones at each requested width (the same hidden channels in every
    layer, since they are one residual stream; heads and FFN units per layer)."""
    hidden, heads, kv, ffn = check_widths(config, hidden_size, num_attention_heads, num_key_value_heads, intermediate_size)
    chosen = [choose_heads(s, _kv_heads(config), heads, kv) for s in scores.heads]
    return WidthKeep(hidden=_top(scores.hidden, hidden), heads=[q for q, _ in chosen], kv_heads=[g for _, g in chosen],
                     ffn=[_top(s, ffn) for s in scores.ffn])


# The index set each dimension of a tensor keeps: (rows, columns) of a Linear's weight, (rows,) of a bias or a norm
# weight; None keeps that dimension whole. "q"/"kv": the rows (or o_proj columns) of the kept query/KV heads.
_LAYER_CUTS = {
    "self_attn.q_proj": ("q", "hidden"), "self_attn.k_proj": ("kv", "hidden"), "self_attn.v_proj": ("kv", "hidden"),
    "self_attn.o_proj": ("hidden", "q"), "mlp.gate_proj": ("ffn", "hidden"), "mlp.up_proj": ("ffn", "hidden"),
    "mlp.down_proj": ("hidden", "ffn"), "input_layernorm": ("hidden",), "post_attention_layernorm": ("hidden",),
}
_MODEL_CUTS = {"model.embed_tokens": (None, "hidden"), "model.norm": ("hidden",), "lm_head": (None, "hidden")}


def _head_rows(heads: torch.Tensor, d: int) -> torch.Tensor:
    """The projection rows of `heads`: head h owns rows h*d .. h*d + d - 1."""
    return (heads[:, None] * d + torch.arange(d)).flatten()


def _check_keep(keep: WidthKeep, config, n_layers: int) -> None:
    """Every layer keeps as many heads, KV heads and FFN units, and its query heads are grouped as in check_widths."""
    if not (len(keep.heads) == len(keep.kv_heads) == len(keep.ffn) == n_layers):
        raise EdgestillError(f"a width cut needs heads, KV heads and FFN units for each of the {n_layers} layers")
    group = config.num_attention_heads // _kv_heads(config)
    for what in (keep.heads, keep.kv_heads, keep.ffn):
        if len({len(x) for x in what}) != 1:
            raise EdgestillError("every layer of a width-pruned student keeps the same number of heads and FFN units")
    for q, kv in zip(keep.heads, keep.kv_heads):
        if len(q) % len(kv) or not torch.equal(q // group, kv.repeat_interleave(len(q) // len(kv))):
            raise EdgestillError(f"kept query heads {q.tolist()} are not {len(kv)} equal groups of KV heads {kv.tolist()}")


@torch.no_grad()
def cut_width(model, keep: WidthKeep):
    """A new model of `model`'s class holding only the kept units (the model is left untouched): smaller tensors and
    a config that says so (hidden_size, num_attention_heads, num_key_value_heads, head_dim, intermediate_size)."""
    blocks = _blocks(model)
    _check_keep(keep, model.config, len(blocks))
    d = head_dim(model.config)
    cfg = copy.deepcopy(model.config)
    cfg.hidden_size, cfg.head_dim = len(keep.hidden), d
    cfg.num_attention_heads, cfg.num_key_value_heads = len(keep.heads[0]), len(keep.kv_heads[0])
    cfg.intermediate_size = len(keep.ffn[0])
    state = {}
    for name, tensor in model.state_dict().items():
        module, kind = name.rsplit(".", 1)
        parts = module.split(".")
        if parts[:2] == ["model", "layers"]:
            i = int(parts[2])
            cuts = _LAYER_CUTS.get(".".join(parts[3:]))
            index = {"hidden": keep.hidden, "q": _head_rows(keep.heads[i], d), "kv": _head_rows(keep.kv_heads[i], d),
                     "ffn": keep.ffn[i]}
        else:
            cuts, index = _MODEL_CUTS.get(module), {"hidden": keep.hidden}
        if cuts is None:
            raise EdgestillError(f"width pruning knows the tensors of Llama-style decoders; '{name}' of "
                                 f"{type(model).__name__} is not one of them: leave the width keys of student unset")
        for axis, key in enumerate(cuts if kind == "weight" else cuts[:1]):
            if key is not None:
                tensor = tensor.index_select(axis, index[key])
        state[name] = tensor
    student = type(model)(cfg).to(next(model.parameters()).dtype)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise EdgestillError(f"width pruning {type(model).__name__} left weights unset: {missing[:3]} {unexpected[:3]}")
    if tied:
        student.tie_weights()
    return student.eval()


def prune_width(model, calibration: list[torch.Tensor] | None, hidden_size: int | None = None,
                num_attention_heads: int | None = None, num_key_value_heads: int | None = None,
                intermediate_size: int | None = None, importance: str = "activation"):
    """`model` cut to these widths (None keeps one), units ranked by `importance` (activation: on `calibration`)."""
    if importance not in IMPORTANCE:
        raise EdgestillError(f"width importance '{importance}' is unknown; use activation or weight")
    widths = (hidden_size, num_attention_heads, num_key_value_heads, intermediate_size)
    check_widths(model.config, *widths)  # a bad size fails before the forward passes
    scores = activation_scores(model, calibration) if importance == "activation" else weight_scores(model)
    return cut_width(model, width_keep(scores, model.config, *widths))
