"""Low-rank factorization of linear layers and embeddings, with ranks chosen to meet a size budget.

Method [7] of docs/references.md (KD + low-rank factorization for a lightweight LM). The paper's text
was not available; this is a reconstruction [R] from standard methods, knobs configurable:

- a dense W (out x in) becomes U·V with U (out x r), V (r x in), initialised from the truncated SVD
  W ≈ U_r Σ_r V_rᵀ as U = U_r·√Σ_r, V = √Σ_r·V_rᵀ; the bias is kept. At r = min(out, in) the
  layer is reproduced exactly. Stored parameters: r·(out + in) instead of out·in.
- an embedding table (vocab x hidden) becomes ALBERT-style vocab x E times E x hidden
  (Lan et al., 2020, arXiv:1909.11942), initialised the same way from the SVD of the table.
- ranks per matrix: given explicitly, or chosen to meet a parameter / byte budget for the whole model.
  Strategy "global" keeps the singular values with the largest share of their matrix's energy per
  stored parameter (σ²/‖W‖²_F / (out+in)) across all matrices, i.e. a greedy knapsack; strategy
  "energy" keeps the same fraction of energy in every matrix, the largest fraction that fits.

Lifecycle: `factorize_(model, LowRankConfig(...))` replaces modules in place and records the rank plan
in `model.config.edgestill_lowrank`, so `load_factorized(folder, cls)` can rebuild the same shapes and
load the safetensors weights. The modules are real smaller tensors: `stored_params` / `stored_bytes`
and the saved file shrink.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgestill.errors import EdgestillError

PLAN_KEY = "edgestill_lowrank"  # attribute of model.config holding {"linear": {name: r}, "embedding": {name: E}}


class LowRankLinear(nn.Module):
    """y = (x Vᵀ) Uᵀ + b: a rank-r stand-in for nn.Linear(in_features, out_features)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.V = nn.Parameter(torch.empty(rank, in_features))  # (r, in)
        self.U = nn.Parameter(torch.empty(out_features, rank))  # (out, r)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.V, std=in_features ** -0.5)
        nn.init.normal_(self.U, std=rank ** -0.5)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        out_f, in_f = linear.weight.shape
        rank = max(1, min(rank, out_f, in_f))
        layer = cls(in_f, out_f, rank, bias=linear.bias is not None).to(linear.weight.dtype)
        U, V = svd_factors(linear.weight, rank)
        layer.U.copy_(U)
        layer.V.copy_(V)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, self.bias)  # (..., in) -> (..., r) -> (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class FactorizedEmbedding(nn.Module):
    """ALBERT-style embedding: a (vocab x E) table followed by an (E x hidden) projection."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank, self.padding_idx = num_embeddings, embedding_dim, rank, padding_idx
        self.table = nn.Parameter(torch.randn(num_embeddings, rank) * 0.02)  # (vocab, E)
        self.proj = nn.Parameter(torch.randn(rank, embedding_dim) * rank ** -0.5)  # (E, hidden)

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, emb: nn.Embedding, rank: int) -> "FactorizedEmbedding":
        vocab, dim = emb.weight.shape
        rank = max(1, min(rank, vocab, dim))
        layer = cls(vocab, dim, rank, emb.padding_idx).to(emb.weight.dtype)
        table, proj = svd_factors(emb.weight, rank)
        layer.table.copy_(table)
        layer.proj.copy_(proj)
        return layer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.table) @ self.proj  # (B, T) -> (B, T, E) -> (B, T, hidden)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"


@torch.no_grad()
def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W (m x n) ≈ A·B with A = U_r√Σ_r (m x r), B = √Σ_r V_rᵀ (r x n); computed in float64."""
    U, S, Vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = S[:rank].sqrt()
    return (U[:, :rank] * root).to(weight.dtype), (root[:, None] * Vh[:rank]).to(weight.dtype)


# ---------------------------------------------------------------- counting


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        key = (p.data_ptr(), p.numel())  # tied weights share storage: count once
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def stored_params(model: nn.Module) -> int:
    """Parameters that are really stored (shared tensors once; no masks, no simulated sparsity)."""
    return sum(p.numel() for p in _unique_params(model))


def stored_bytes(model: nn.Module) -> int:
    """Bytes of those parameters plus persistent buffers, in their current dtypes (≈ the safetensors payload)."""
    total = sum(p.numel() * p.element_size() for p in _unique_params(model))
    persistent = dict(model.named_buffers())
    for name, b in model.state_dict(keep_vars=True).items():
        if name in persistent and not isinstance(b, nn.Parameter):
            total += b.numel() * b.element_size()
    return total


# ---------------------------------------------------------------- choosing ranks


@dataclass
class LowRankConfig:
    """What to factorize and how small to get.

    Give `ranks` (exact module name -> rank; an embedding's rank is its E), or a budget for the whole
    model: `target_params`, or `target_bytes` (divided by the element size of the weights). Module
    names are matched by `targets` / `skip` / `embeddings`: a `re:` prefix marks a regex (full match),
    a plain string is an exact name.
    """

    ranks: dict[str, int] | None = None
    target_params: int | None = None
    target_bytes: int | None = None
    strategy: str = "global"  # "global" (greedy over all singular values) or "energy" (same energy share everywhere)
    targets: tuple[str, ...] = ("re:.*",)  # nn.Linear modules considered
    skip: tuple[str, ...] = ("re:(.*\\.)?classifier(\\..*)?", "re:(.*\\.)?pooler(\\..*)?")
    embeddings: tuple[str, ...] = ("re:(.*\\.)?word_embeddings",)  # nn.Embedding modules considered
    min_rank: int = 1
    multiple_of: int = 1  # round ranks down to a multiple (8 helps matmul kernels); never below min_rank
    extra: dict = field(default_factory=dict)


def _matches(name: str, patterns) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif p == name:
            return True
    return False


def factorizable(model: nn.Module, cfg: LowRankConfig) -> dict[str, nn.Module]:
    """Name -> module for every nn.Linear / nn.Embedding the config selects (in model order)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and _matches(name, cfg.targets) and not _matches(name, cfg.skip):
            out[name] = m
        elif isinstance(m, nn.Embedding) and _matches(name, cfg.embeddings):
            out[name] = m
    return out


def _weight(m: nn.Module) -> torch.Tensor:
    return m.weight  # Linear: (out, in); Embedding: (vocab, hidden)


def max_useful_rank(m: int, n: int) -> int:
    """The largest rank at which U·V still stores fewer numbers than the dense m x n matrix."""
    return max(1, (m * n - 1) // (m + n))


@torch.no_grad()
def choose_ranks(model: nn.Module, cfg: LowRankConfig) -> dict[str, int]:
    """Rank per selected matrix so that the whole model stores at most the budget.

    A rank of `min(m, n)` in the result means "keep this matrix dense" (it fitted the budget whole).
    """
    mods = factorizable(model, cfg)
    if not mods:
        raise EdgestillError("no layer matched the low-rank targets; check LowRankConfig.targets/embeddings")
    elt = next(iter(mods.values())).weight.element_size()
    if cfg.target_params is not None:
        budget = int(cfg.target_params)
    elif cfg.target_bytes is not None:
        budget = int(cfg.target_bytes) // elt
    else:
        raise EdgestillError("give LowRankConfig.ranks, target_params or target_bytes")
    fixed = stored_params(model) - sum(_weight(m).numel() for m in mods.values())
    shapes = {k: tuple(_weight(m).shape) for k, m in mods.items()}
    floor = sum(cfg.min_rank * (a + b) for a, b in shapes.values())
    if fixed + floor > budget:
        raise EdgestillError(
            f"budget of {budget:,} params is below what the model needs even at rank {cfg.min_rank}: {fixed:,} params are not "
            f"factorizable (norms, biases, position embeddings, head) plus {floor:,}; use fewer layers, trim the vocabulary, "
            "or raise the budget"
        )
    energy = {}
    for k, m in mods.items():
        s = torch.linalg.svdvals(_weight(m).double())
        energy[k] = (s**2 / (s**2).sum().clamp_min(1e-30)).tolist()
    left = budget - fixed - floor
    ranks = {k: cfg.min_rank for k in mods}
    if cfg.strategy == "global":
        cand = []
        for k, (a, b) in shapes.items():
            for j in range(cfg.min_rank, max_useful_rank(a, b)):
                cand.append((energy[k][j] / (a + b), k))
        cand.sort(key=lambda t: -t[0])
        for _, k in cand:  # within a matrix σ is descending, so each matrix fills a prefix
            a, b = shapes[k]
            if a + b <= left:
                ranks[k] += 1
                left -= a + b
    elif cfg.strategy == "energy":
        def ranks_for(frac: float) -> dict[str, int]:
            out = {}
            for k, (a, b) in shapes.items():
                cum, r = 0.0, 0
                while r < len(energy[k]) and cum < frac:
                    cum += energy[k][r]
                    r += 1
                out[k] = min(max(r, cfg.min_rank), max_useful_rank(a, b))
            return out

        def cost(rk):
            return sum(r * sum(shapes[k]) for k, r in rk.items())

        lo, hi = 0.0, 1.0
        for _ in range(40):  # bisection on the kept energy share
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(ranks_for(mid)) <= budget - fixed else (lo, mid)
        ranks = ranks_for(lo)
        left = budget - fixed - cost(ranks)
    else:
        raise EdgestillError(f"unknown low-rank strategy {cfg.strategy!r}; use 'global' or 'energy'")
    if cfg.multiple_of > 1:
        for k, r in ranks.items():
            new = max(cfg.min_rank, r - r % cfg.multiple_of)
            left += (r - new) * sum(shapes[k])
            ranks[k] = new
    # a matrix at its largest useful rank is nearly as big as dense: keep it dense (exact) if that still fits
    for k, (a, b) in shapes.items():
        if ranks[k] >= max_useful_rank(a, b) - max(0, cfg.multiple_of - 1) and a * b - ranks[k] * (a + b) <= left:
            left -= a * b - ranks[k] * (a + b)
            ranks[k] = min(a, b)
    return ranks


# ---------------------------------------------------------------- applying


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` in place of the submodule called `name` (dotted, as in named_modules)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def factorize_(model: nn.Module, cfg: LowRankConfig | None = None, init: str = "svd") -> dict:
    """Replace the selected matrices of `model` in place by their rank-r factorizations.

    A rank of min(m, n) keeps that matrix dense. `init="svd"` initialises from the truncated SVD;
    `init="empty"` only builds the shapes (for loading saved weights). Returns the plan
    {"linear": {name: rank}, "embedding": {name: E}}, also stored in `model.config.edgestill_lowrank`.
    """
    cfg = cfg or LowRankConfig()
    ranks = dict(cfg.ranks) if cfg.ranks is not None else choose_ranks(model, cfg)
    mods = factorizable(model, cfg) if cfg.ranks is None else {k: model.get_submodule(k) for k in ranks}
    plan = {"linear": {}, "embedding": {}}
    for name, rank in ranks.items():
        m = mods[name]
        a, b = _weight(m).shape
        if isinstance(m, nn.Linear):
            if rank >= min(a, b) and cfg.ranks is None:
                continue  # the budget kept it dense
            new = LowRankLinear.from_linear(m, rank) if init == "svd" else LowRankLinear(b, a, min(rank, a, b), m.bias is not None)
            plan["linear"][name] = new.rank
        elif isinstance(m, nn.Embedding):
            if rank >= min(a, b) and cfg.ranks is None:
                continue
            new = FactorizedEmbedding.from_embedding(m, rank) if init == "svd" else FactorizedEmbedding(a, b, min(rank, a, b), m.padding_idx)
            plan["embedding"][name] = new.rank
        else:
            raise EdgestillError(f"'{name}' is a {type(m).__name__}; only nn.Linear and nn.Embedding can be factorized")
        set_module(model, name, new.to(_weight(m).device, _weight(m).dtype))
    config = getattr(model, "config", None)
    if config is not None:
        previous = getattr(config, PLAN_KEY, None) or {"linear": {}, "embedding": {}}
        merged = {k: {**previous.get(k, {}), **plan[k]} for k in ("linear", "embedding")}
        setattr(config, PLAN_KEY, merged)
    return plan


def apply_plan_(model: nn.Module, plan: dict) -> None:
    """Rebuild the factorized shapes recorded in `plan` (weights uninitialised; load them afterwards)."""
    ranks = {**plan.get("linear", {}), **plan.get("embedding", {})}
    if ranks:
        factorize_(model, LowRankConfig(ranks=ranks), init="empty")


def load_factorized(folder: str | Path, model_cls, dtype=torch.float32):
    """Load a model saved by `save_pretrained` after `factorize_` (its config carries the rank plan)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    model = model_cls(config)
    apply_plan_(model, getattr(config, PLAN_KEY, None) or {})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EdgestillError(f"'{folder}' holds no .safetensors weights; save the model with save_pretrained")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied or non-persistent tensors may legitimately be absent (a tied head shares the loaded embedding's storage);
    # anything else is a mismatch
    current = model.state_dict()
    loaded_ptrs = {current[k].data_ptr() for k in state if k in current}
    missing = [k for k in missing if not k.endswith("position_ids") and not k.endswith("token_type_ids")
               and current[k].data_ptr() not in loaded_ptrs]
    if missing or unexpected:
        raise EdgestillError(f"'{folder}' does not match its rank plan (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                             "was it saved by another edgestill version?")
    return model.to(dtype).eval()


@torch.no_grad()
def reconstruction_error(model_before_weight: torch.Tensor, layer: nn.Module) -> float:
    """Relative Frobenius error ‖W − U·V‖/‖W‖ of a factorized layer against the dense weight it replaced."""
    if isinstance(layer, LowRankLinear):
        approx = layer.U @ layer.V
    elif isinstance(layer, FactorizedEmbedding):
        approx = layer.table @ layer.proj
    else:
        approx = layer.weight
    return float((model_before_weight - approx).norm() / model_before_weight.norm().clamp_min(1e-30))


__all__ = [
    "LowRankLinear", "FactorizedEmbedding", "LowRankConfig", "svd_factors", "stored_params", "stored_bytes",
    "choose_ranks", "factorize_", "apply_plan_", "load_factorized", "reconstruction_error", "max_useful_rank",
]
