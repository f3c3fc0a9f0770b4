"""Feature and relation transfer: hidden states, self-attention relations, batch-embedding relations.

Three small pieces a loop can add to a logit loss. None of them needs the teacher's and the
student's widths, depths or head counts to match.

- `HiddenStateMSE`: ||H_s W - H_t||^2 through a learned projection W per mapped layer, with a layer
  map (student layer i <- teacher layer g(i)), as in FitNets (Romero et al. 2015) and TinyBERT
  (Jiao et al. 2020). Its projections are trainable: give its parameters to the optimizer.
- `relation_kl` / `minilm_relation_loss`: MiniLMv2 self-attention relation distillation (Wang et al.
  2021, "MiniLMv2: Multi-Head Self-Attention Relation Distillation"). Queries, keys and values of one
  layer are re-split into a fixed number of *relation heads* R, the relations softmax(X X^T / sqrt(d_r))
  are compared with KL(teacher || student). Re-splitting is what lets teacher and student differ in
  width and head count. A causal mask makes it fit decoders. `CaptureQKV` records Q, K, V with forward
  hooks on `q_proj`/`k_proj`/`v_proj` (HF Llama, Mistral, Qwen...) or `query`/`key`/`value` (HF BERT).
- `rkd_distance_loss` / `rkd_angle_loss`: Relational KD (Park et al. 2019, "Relational Knowledge
  Distillation"), distance and angle structure of a batch of embeddings.

Usage (decoder, live teacher):

    with CaptureQKV(student) as s_qkv, CaptureQKV(teacher) as t_qkv:
        out_s = student(input_ids=ids, output_hidden_states=True)
        with torch.no_grad():
            out_t = teacher(input_ids=ids, output_hidden_states=True)
    loss = hidden_mse(out_s.hidden_states, out_t.hidden_states, mask) \\
         + minilm_relation_loss(s_qkv.outputs, t_qkv.outputs, num_relation_heads=4, causal=True, mask=mask)

Notes: for Llama-style models the hooked projections are the pre-RoPE queries and keys (MiniLMv2 was
defined on BERT, which has no rotary embedding); with grouped-query attention the keys and values are
narrower than the queries, so R must divide every width involved.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgestill.distill.losses import kl_div
from edgestill.errors import EdgestillError


def _masked_token_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


# --- hidden states ----------------------------------------------------------------------------------

def uniform_layer_map(num_student_layers: int, num_teacher_layers: int) -> dict[int, int]:
    """Student layer i <- teacher layer round(i * L_t / L_s), for i = 1..L_s (indices into HF `hidden_states`,
    where 0 is the embedding output and i the output of block i); the last layers are always paired."""
    return {i: round(i * num_teacher_layers / num_student_layers) for i in range(1, num_student_layers + 1)}


def sliced_layer_map(layers_kept: Sequence[int], num_teacher_layers: int) -> dict[int, int]:
    """For a student sliced out of the teacher (`student.layers`): student block i is teacher block layers_kept[i-1],
    so student hidden state i <- teacher hidden state layers_kept[i-1] + 1; the last layers are always paired."""
    kept = sorted(layers_kept)
    layer_map = {i + 1: t + 1 for i, t in enumerate(kept)}
    layer_map[len(kept)] = num_teacher_layers
    return layer_map


class HiddenStateMSE(nn.Module):
    """Mean over mapped layers of ||H_s^(i) W_i - H_t^(g(i))||^2 per token (averaged over the teacher width).

    layer_map: {student index: teacher index} into the models' `hidden_states` tuples (`uniform_layer_map`, or
    `sliced_layer_map` for a student sliced out of the teacher). Each pair gets its own Linear(student_dim ->
    teacher_dim, no bias), initialised to the identity where the widths allow, so equal-width models start
    from plain MSE.
    normalize: divide each layer's error by the teacher's mean squared activation there (detached), so 1.0
    means "no better than predicting zeros" whatever the layer's scale. Pre-norm decoders (Llama, SmolLM2)
    have residual streams whose scale grows with depth and carries outlier channels in the hundreds; raw MSE
    there is ~1e2-1e3 per element and swamps a KD term of ~0.1 at any sensible weight. False is the raw
    FitNets/TinyBERT MSE (post-norm BERT hidden states are unit scale, where the two agree up to a constant).
    """

    def __init__(self, student_dim: int, teacher_dim: int, layer_map: Mapping[int, int], normalize: bool = True):
        super().__init__()
        self.normalize = normalize
        if not layer_map:
            raise EdgestillError("HiddenStateMSE needs a non-empty layer map, e.g. uniform_layer_map(L_student, L_teacher)")
        self.layer_map = {int(s): int(t) for s, t in layer_map.items()}
        self.proj = nn.ModuleDict({str(s): nn.Linear(student_dim, teacher_dim, bias=False) for s in self.layer_map})
        for p in self.proj.values():
            with torch.no_grad():
                p.weight.zero_()
                n = min(student_dim, teacher_dim)
                p.weight[:n, :n] = torch.eye(n)

    def forward(self, student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        losses = []
        for s, t in self.layer_map.items():
            if s >= len(student_hidden) or t >= len(teacher_hidden):
                raise EdgestillError(f"layer map pairs student hidden state {s} with teacher hidden state {t}, but the "
                                     f"models return {len(student_hidden)} and {len(teacher_hidden)}; "
                                     "build the map with uniform_layer_map(L_student, L_teacher)")
            h_s = self.proj[str(s)](student_hidden[s].float())  # (B, T, D_t)
            h_t = teacher_hidden[t].detach().float()  # (B, T, D_t)
            err = _masked_token_mean((h_s - h_t).pow(2).mean(-1), mask)
            if self.normalize:
                err = err / _masked_token_mean(h_t.pow(2).mean(-1), mask).clamp_min(1e-12)
            losses.append(err)
        return torch.stack(losses).mean()


# --- MiniLMv2 self-attention relations ---------------------------------------------------------------

def attention_relations(x: torch.Tensor, num_relation_heads: int, causal: bool = False,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log relation matrices log softmax(X_r X_r^T / sqrt(d_r)), (B, R, T, T), from X (B, T, D).

    X is re-split into R relation heads of width d_r = D / R. `causal` hides future positions (decoders);
    `mask` (B, T) hides padded keys. Hidden entries are -inf (probability 0).
    """
    b, t, d = x.shape
    if d % num_relation_heads:
        raise EdgestillError(f"{num_relation_heads} relation heads do not divide a width of {d}; "
                             "choose a number of relation heads that divides every Q/K/V width of both models")
    d_r = d // num_relation_heads
    xr = x.float().view(b, t, num_relation_heads, d_r).transpose(1, 2)  # (B, R, T, d_r)
    scores = xr @ xr.transpose(-1, -2) / math.sqrt(d_r)  # (B, R, T, T)
    hidden = torch.zeros(t, t, dtype=torch.bool, device=x.device)
    if causal:
        hidden = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)  # key j > query i
    hidden = hidden.expand(b, 1, t, t)
    if mask is not None:
        hidden = hidden | ~mask.bool().view(b, 1, 1, t)
    # A query whose keys are all hidden (a padded first position) keeps its own key, so rows stay distributions.
    eye = torch.eye(t, dtype=torch.bool, device=x.device)
    hidden = hidden & ~(hidden.all(-1, keepdim=True) & eye)
    return F.log_softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)


def relation_kl(student_x: torch.Tensor, teacher_x: torch.Tensor, num_relation_heads: int, causal: bool = False,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher relation || student relation), averaged over relation heads and (unmasked) query rows.

    student_x (B, T, D_s), teacher_x (B, T, D_t): D_s and D_t may differ; both must be divisible by R.
    """
    if student_x.shape[:2] != teacher_x.shape[:2]:
        raise EdgestillError(f"relation KD needs the same (batch, sequence) on both sides, got {tuple(student_x.shape[:2])} "
                             f"and {tuple(teacher_x.shape[:2])}; run teacher and student on the same input_ids")
    log_s = attention_relations(student_x, num_relation_heads, causal, mask)  # (B, R, T, T)
    log_t = attention_relations(teacher_x.detach(), num_relation_heads, causal, mask)
    per_row = kl_div(log_t, log_s).mean(1)  # (B, T)
    return _masked_token_mean(per_row, mask)


def minilm_relation_loss(student_qkv: Mapping[str, torch.Tensor], teacher_qkv: Mapping[str, torch.Tensor],
                         num_relation_heads: int, causal: bool = False, mask: torch.Tensor | None = None,
                         relations: Sequence[str] = ("query", "key", "value")) -> torch.Tensor:
    """MiniLMv2: sum of the Q-Q, K-K and V-V relation KLs (Wang et al. 2021, eq. 5-7).

    `student_qkv`, `teacher_qkv`: {"query"|"key"|"value": (B, T, D)}, e.g. `CaptureQKV(...).outputs`.
    """
    missing = [r for r in relations if r not in student_qkv or r not in teacher_qkv]
    if missing:
        raise EdgestillError(f"no captured {', '.join(missing)} projections; wrap both forward passes in CaptureQKV "
                             "(does the model have q_proj/k_proj/v_proj or query/key/value modules?)")
    return sum(relation_kl(student_qkv[r], teacher_qkv[r], num_relation_heads, causal, mask) for r in relations)


_PROJECTION_NAMES = {"query": ("q_proj", "query"), "key": ("k_proj", "key"), "value": ("v_proj", "value")}
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


class CaptureQKV:
    """Context manager recording the outputs of one layer's query/key/value projections via forward hooks.

        with CaptureQKV(model, layer=-1) as qkv:
            model(input_ids=ids)
        qkv.outputs  # {"query": (B, T, D_q), "key": (B, T, D_k), "value": (B, T, D_v)}

    `layer` indexes the transformer blocks (negative counts from the end; MiniLMv2 uses the last layer of
    small students and an upper-middle one of large teachers). The recorded tensors keep their autograd
    graph, so student relations are trainable; run the teacher under torch.no_grad().
    """

    def __init__(self, model: nn.Module, layer: int = -1):
        blocks: dict[int, dict[str, nn.Module]] = {}
        for name, module in model.named_modules():
            found = _LAYER_INDEX.findall(name)
            if not found:
                continue
            leaf = name.rsplit(".", 1)[-1]
            for role, leaves in _PROJECTION_NAMES.items():
                if leaf in leaves:
                    blocks.setdefault(int(found[-1]), {})[role] = module
        if not blocks:
            raise EdgestillError(f"{type(model).__name__} has no q_proj/k_proj/v_proj (or query/key/value) modules inside "
                                 "numbered layers; attention-relation KD needs a Llama- or BERT-style model")
        indices = sorted(blocks)
        if not -len(indices) <= layer < len(indices):
            raise EdgestillError(f"layer {layer} is out of range for a model with {len(indices)} layers")
        self.layer = indices[layer]
        self.modules = blocks[self.layer]
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "CaptureQKV":
        self.outputs = {}
        for role, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(role)))
        return self

    def _hook(self, role: str):
        def hook(module, inputs, output):
            self.outputs[role] = output
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# --- RKD on batch embeddings -------------------------------------------------------------------------

def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(e, e)  # (N, N)
    off_diag = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return d / d[off_diag].mean().clamp_min(1e-12)


def rkd_distance_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """RKD-D: Huber loss between the pairwise distances of a batch (N, D_s) and (N, D_t), each divided by its
    mean distance (so scale and width do not matter). Park et al. 2019, eq. 6."""
    if len(student_emb) != len(teacher_emb) or len(student_emb) < 2:
        raise EdgestillError("RKD needs the same batch of at least 2 embeddings from teacher and student")
    return F.smooth_l1_loss(_normalised_distances(student_emb.float()), _normalised_distances(teacher_emb.detach().float()))


def _angles(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=-1)  # (N, N, D): [a, b] = unit(e_b - e_a)
    return torch.bmm(diff, diff.transpose(1, 2))  # (N, N, N): [a, b, c] = cos of the angle b-a-c


def rkd_angle_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """RKD-A: Huber loss between the cosines of the angles every triplet of the batch forms. Park et al. 2019, eq. 8."""
    if len(student_emb) != len(teacher_emb) or len(student_emb) < 3:
        raise EdgestillError("RKD angle loss needs the same batch of at least 3 embeddings from teacher and student")
    return F.smooth_l1_loss(_angles(student_emb.float()), _angles(teacher_emb.detach().float()))
