"""GPTQ: post-training quantization that uses calibration data, stored in the exact runtime formats.

Paper: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (2022), arXiv:2210.17323.

What it changes: round-to-nearest (RTN, `quantize_(..., step="convert")`) rounds every weight
on its own. GPTQ quantizes a Linear's weight one input column at a time and, after each
column, moves the columns not yet quantized so as to cancel the error that column made on the
layer's outputs for the calibration inputs X. It minimises ||W X - W_hat X||^2 greedily, using
H = 2 X X^T / n (one (in, in) matrix per Linear, shared by all rows) and the upper Cholesky
factor of the damped H^-1 (the paper's Algorithm 1, with its lazy batches of `block_columns`
columns). The weights that come out are values of the target format, so the model still
exports to the same GGUF / ONNX bytes; only which codes are chosen changes.

What was reconstructed, and how the runtime formats fit in:
  - Scales are static per format block, as GPTQ's `groupsize`: when the column loop enters a
    block (32 columns for Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, `block_size` for Int4Block, 256 for the K-quants, the
    whole row for Int8PerChannel), that block's scale(s) are computed with the format's own rule
    from the block's *current* weights, i.e. after the error updates of the earlier columns
    (lazy batches always start at a block start or contain the whole block, so these are the
    true current values). Each column is then coded with the format's own rounding rule and
    that block's scales. With a diagonal H (no correlation, nothing to compensate) the result
    is bit for bit `fmt.fake_quant(W)`; tests/quant/test_gptq.py checks that for every format.
  - Fixed point: the export re-quantizes what it is given, so `fmt.fake_quant(W_hat)` must equal
    W_hat exactly. The scale of a block comes from its extreme weight(s) (the largest magnitude,
    or the min and the max), and an error update may shrink such a weight so that no code
    reaches the end of the grid; the format would then pick a smaller scale on re-quantization
    and every code of the block would move. So the weight(s) that set a block's scale keep the
    code RTN gives them at block entry (their error is still passed on to later columns). With
    that, for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, Int8PerChannel and symmetric Int4Block the GPTQ
    result is already a fixed point (checked by the tests).
  - The result is then "settled": W_hat = fmt.fake_quant(W_hat), repeated until nothing changes,
    which is a no-op for the formats above, and for Q3_K and Q2_K: GPTQ runs with their quantizer
    fitted per 256-column super-block at entry (llama.cpp's own search, q3_k.py, q2_k.py), its values
    lie on that entry grid, and their fake_quant keeps weights that already hold their values. It is
    not a no-op for:
      Q4_K: its scales come from a least-squares search over each 32-weight sub-block, not
        from the extremes, so no weight can be pinned. GPTQ runs with the Q4_K quantizer fitted
        per 256-column super-block at entry (llama.cpp's own search, edgestill.quant.q4_k) and
        the final fake_quant refits the search on the GPTQ values. In the tests that moves about
        10 % of the weights by a small fraction of a step (a refitted sub-block scale), and the
        output error rises by 2 % (0.052 vs 0.051), still far below RTN's 0.072.
      Int4Block(symmetric=False): ORT's rounded zero point makes even RTN not idempotent; the
        settle loop takes two or three rounds and moves weights by float32 ulps only.
  - Fallbacks: each Linear uses `resolve_format(requested, in_features)`, as quantize_ does.
  - act_order (the paper's "quantize columns in order of decreasing H_ii") permutes whole
    format blocks (by their summed diag(H)) and the columns inside each block, never mixing
    blocks, so each block is still entered once with all its current weights.
  - Input features that never fire in the calibration data (H_ii = 0) get H_ii = 1 and keep
    their weights (the reference implementation zeroes them; a runtime input may not be zero).
  - The damping is `damp` times the mean of diag(H) (the paper's 1 %); if a Cholesky factor
    fails it is retried with 10x, 100x, ... the damping.

Pipeline (sequential, the paper's): calibration batches run once through the float model only
to capture each decoder layer's non-hidden arguments (masks, rotary cos/sin) and the first
layer's input. Then, layer by layer: forward hooks on the layer's targeted Linears accumulate H
while the calibration hidden states run through the layer; its Linears are quantized; the layer
is run again, now quantized, and its outputs are the next layer's inputs. So every layer is
calibrated on what the already-quantized layers before it produce. All Linears of one layer see
inputs from that layer's float pass (no re-run between q/k/v and o_proj, "true sequential" is
not done). The decoder layers are the nn.ModuleList holding the most targeted Linears (such as
`model.layers`); each layer's input must be the previous layer's output, which is checked once.
A model without such a list (a plain nn.Sequential, one Linear) gets one pass: all targeted
Linear inputs are collected on the float model at once.

Not quantized with GPTQ (RTN instead, via quantize_(..., step="convert"), in the same report):
Linears outside the decoder layers, such as lm_head, tied or not (a tied lm_head's weight is
also the embedding table, whose inputs are token ids, so its format and values follow RTN, and
the embedding gets the same values as quantize_ documents).

Lifecycle: calibrate (capture inputs, accumulate H) -> apply (column loop, per Linear) ->
finalize (settle, write the exact values into plain nn.Linear weights, report).

Sample:
    config = QuantConfig(default=GGUFQ4_0(), plan={"re:.*down_proj": GGUFQ8_0()})
    calibration = [ids[i:i + 8] for i in range(0, 128, 8)]  # (8, 512) int64 token batches
    report = gptq_quantize_(model, config, calibration)
    export_gguf(model, ...)  # stores exactly the GPTQ values

Arguments of gptq_quantize_:
    config          which format each Linear gets (QuantConfig: skip, plan, default).
    calibration     input_ids batches, (B, T) or (T,) int64; a few hundred sequences of real text.
    damp            the fraction of mean(diag(H)) added to diag(H) (GPTQ's percdamp).
    block_columns   columns per lazy batch (speed only; any value gives the same math up to
                    float rounding; batches are stretched to keep format blocks whole).
    act_order       quantize blocks and columns in order of decreasing H_ii (see above).

Cost: each Linear costs one Cholesky of (in, in) and a Python loop over its input columns;
float32 throughout, on the model's device. Exactness of the stored values is promised as for
quantize_: in float32 (a bf16/fp16 model rounds them once more to its dtype).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from edgestill.errors import EdgestillError
from edgestill.progress import progress_bar
from edgestill.quant.fake_quant import (
    FakeQuantLinear,
    LayerReport,
    QuantConfig,
    check_patterns_used,
    quantize_,
    tied_embeddings,
)
from edgestill.quant.formats import FORMATS, Format, format_names, format_spec, resolve_format


def rtn_quantize_(model: nn.Module, config: QuantConfig) -> list[LayerReport]:
    """Round-to-nearest post-training quantization: the baseline GPTQ is measured against."""
    return quantize_(model, config, step="convert")


def _enter(fmt: Format, block: torch.Tensor) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The quantizer of one block: quantize(column (rows,), position in block) -> dequantized (rows,).

    The format's own static-scale coder (`fmt.block_quantizer`, formats.py) for the formats the registry
    marks `gptq`: dequant(x, cols) with this block's scales, and the weights that set them (or None).
    """
    if not isinstance(fmt, FORMATS) or not format_spec(fmt).gptq:
        raise EdgestillError(f"GPTQ has no quantizer for {fmt!r}; it takes {', '.join(format_names(gptq=True))}")
    dequant, anchors = fmt.block_quantizer(block)

    if anchors is None:
        return lambda column, pos: dequant(column[:, None], slice(pos, pos + 1))[:, 0]

    # The weights that set the scales keep the codes they get at entry, so the block stays a fixed point.
    entry = dequant(block, slice(None))  # (rows, g): RTN of the block with these scales
    pinned = torch.zeros_like(block, dtype=torch.bool).scatter_(1, anchors, True)

    def quantize(column: torch.Tensor, pos: int) -> torch.Tensor:
        q = dequant(column[:, None], slice(pos, pos + 1))[:, 0]  # (rows,)
        return torch.where(pinned[:, pos], entry[:, pos], q)

    return quantize


def _block_size(fmt: Format, in_features: int) -> int:
    """Columns that share scales: the format block; the whole row for per-channel (block_size None) and
    scale-free (block_size 1) formats."""
    return fmt.block_size if (fmt.block_size or 1) > 1 else in_features


def _lazy_batches(groups: list[tuple[int, int]], block_columns: int) -> list[tuple[int, int]]:
    """Column ranges of the lazy batches: each block starts a batch or lies wholly inside one.

    Then a block's current weights at entry are all at hand: the batch's running copy holds the
    updates of the batch's earlier columns, and a batch start has every earlier update applied.
    """
    batches, b0, b1 = [], 0, 0
    for g0, g1 in groups:
        if g1 - b0 <= block_columns:
            b1 = g1
            continue
        if b1 > b0:
            batches.append((b0, b1))
        b0 = g0
        while g1 - b0 > block_columns:  # a block longer than a batch (a whole row) spans several
            batches.append((b0, b0 + block_columns))
            b0 += block_columns
        b1 = g1
    if b1 > b0:
        batches.append((b0, b1))
    return batches


def _upper_cholesky_of_inverse(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    mean_diag = hessian.diagonal().mean()
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    for attempt in range(6):
        damped = hessian + (damp * 10**attempt) * mean_diag * eye
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return upper
    raise EdgestillError(f"GPTQ: the Hessian is not positive definite even with damp={damp * 10**5}; "
                         "use more calibration data or a larger damp")


def _settle(w: torch.Tensor, fmt: Format, max_rounds: int = 8) -> torch.Tensor:
    """fmt.fake_quant repeated until it changes nothing (bit for bit)."""
    for _ in range(max_rounds):
        again = fmt.fake_quant(w)
        if torch.equal(again.view(torch.int32), w.view(torch.int32)):
            return w
        w = again
    raise RuntimeError(f"{fmt!r}: fake_quant did not reach a fixed point in {max_rounds} rounds")


@torch.no_grad()
def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, fmt: Format, damp: float = 0.01,
                block_columns: int = 128, act_order: bool = False, settle: bool = True) -> torch.Tensor:
    """GPTQ of one (out, in) weight against H = 2 X X^T / n (in, in): the dequantized weight, float32.

    `settle=False` returns the column loop's result as is (to measure what settling changes).
    """
    w = weight.detach().to(torch.float32).clone()  # (rows, K)
    k = w.shape[1]
    if hessian.shape != (k, k):
        raise EdgestillError(f"GPTQ: Hessian {tuple(hessian.shape)} does not fit a weight with {k} inputs")
    if not fmt.supports(k):
        raise EdgestillError(f"{fmt!r} cannot store rows of {k} weights; use resolve_format")
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    dead = h.diagonal() == 0  # inputs that never fire: keep their weights, quantized on their own
    h[dead, dead] = 1.0

    size = _block_size(fmt, k)
    blocks = [torch.arange(s, min(s + size, k), device=w.device) for s in range(0, k, size)]
    if act_order:
        diag = h.diagonal()
        blocks = sorted(blocks, key=lambda cols: -diag[cols].sum().item())
        blocks = [cols[torch.argsort(-diag[cols], stable=True)] for cols in blocks]
    perm = torch.cat(blocks)  # processing order -> original column
    block_start = torch.cat([cols.min().expand(len(cols)) for cols in blocks])  # original start of each block
    local_pos = (perm - block_start).tolist()  # position of each processed column inside its block
    bounds, start = [], 0
    for cols in blocks:
        bounds.append((start, start + len(cols)))
        start += len(cols)
    block_at = {g0: (g0, g1, cols) for (g0, g1), cols in zip(bounds, blocks)}

    w, h = w[:, perm], h[perm][:, perm]
    hinv = _upper_cholesky_of_inverse(h, damp)  # (K, K) upper
    q_all = torch.zeros_like(w)
    quantize = None
    for b0, b1 in _lazy_batches(bounds, block_columns):
        w1 = w[:, b0:b1].clone()  # (rows, n) running copy of the batch
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            c = b0 + i
            if c in block_at:  # entering a block: its scales from its current weights, in original order
                g0, g1, cols = block_at[c]
                current = w[:, g0:g1] if g0 == b0 else w1[:, g0 - b0:g1 - b0]
                block = torch.empty_like(current)
                block[:, (cols - cols.min())] = current
                quantize = _enter(fmt, block)
            col = w1[:, i]
            q = quantize(col, local_pos[c])
            err = (col - q) / hinv1[i, i]  # (rows,)
            w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1)  # pass the error on to the later columns
            q1[:, i], err1[:, i] = q, err
        q_all[:, b0:b1] = q1
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]

    result = torch.empty_like(q_all)
    result[:, perm] = q_all
    return _settle(result, fmt) if settle else result


# --- calibration: Hessians of the Linears' inputs -------------------------------------------------------

def _accumulate_hessians(linears: dict[str, nn.Linear], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """H = 2 X X^T / n over every input row each Linear sees while `run()` executes."""
    hessians = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device)
                for name, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def hook_for(name):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, module.in_features).to(torch.float32)  # (n, in)
            total = counts[name] + x.shape[0]
            hessians[name].mul_(counts[name] / total).addmm_(x.T, x, alpha=2 / total)
            counts[name] = total
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in linears.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def _forward(model: nn.Module, batch: torch.Tensor):
    if hasattr(getattr(model, "config", None), "use_cache"):  # a transformers model: no KV cache
        return model(input_ids=batch, use_cache=False)
    return model(batch)


def _decoder_layers(model: nn.Module, targets: dict[str, object]) -> tuple[str, nn.ModuleList] | None:
    """The nn.ModuleList (name, module) with the most targeted Linears inside, if one holds any."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            prefix = f"{name}." if name else ""
            count = sum(t.startswith(prefix) for t in targets)
            if count > best_count:
                best, best_count = (name, module), count
    return best


class _Stop(Exception):
    pass


def _capture_layer_calls(model, layers: nn.ModuleList, batches: list[torch.Tensor]):
    """Run the float model up to its last decoder layer; return the first layer's inputs per batch,
    each layer's other arguments per batch, and the second layer's input of the first batch."""
    first_inputs, calls = [], [[] for _ in layers]
    second_input = []

    def hook_for(index):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = kwargs.pop("hidden_states") if not args else args[0]
            calls[index].append((args[1:], kwargs, not args))
            if index == 0:
                first_inputs.append(hidden)
            if index == 1 and not second_input:
                second_input.append(hidden)
            if index == len(layers) - 1:
                raise _Stop  # the rest of the model (final norm, lm_head logits) is not needed
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        for batch in batches:
            try:
                _forward(model, batch)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if len(first_inputs) != len(batches) or any(len(c) != len(batches) for c in calls):
        raise EdgestillError("GPTQ: the model's forward does not call each decoder layer once per batch")
    return first_inputs, calls, (second_input[0] if second_input else None)


def _call_layer(layer: nn.Module, hidden: torch.Tensor, call) -> torch.Tensor:
    args, kwargs, hidden_as_kwarg = call
    out = layer(*args, hidden_states=hidden, **kwargs) if hidden_as_kwarg else layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


# --- the verb -----------------------------------------------------------------------------------------------

@torch.no_grad()
def gptq_quantize_(model: nn.Module, config: QuantConfig, calibration: list[torch.Tensor], damp: float = 0.01,
                   block_columns: int = 128, act_order: bool = False,
                   show_progress: bool = True) -> list[LayerReport]:
    """Quantize `model` in place with GPTQ on `calibration` (input_ids batches); see the module docstring.

    Leaves plain nn.Linear modules holding the exact dequantized values and returns the report
    quantize_(..., step="convert") returns: one LayerReport per selected Linear, in module order.
    """
    if not isinstance(config, QuantConfig):
        raise EdgestillError(f"gptq_quantize_ takes a QuantConfig, got {type(config).__name__}")
    if not calibration:
        raise EdgestillError("gptq_quantize_ needs calibration batches (input_ids tensors)")
    if not damp > 0 or block_columns < 1:
        raise EdgestillError(f"gptq_quantize_: damp={damp} must be > 0 and "
                             f"block_columns={block_columns} >= 1")
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EdgestillError(f"{type(model).__name__} has no nn.Linear modules to quantize")
    if any(isinstance(m, FakeQuantLinear) for _, m in linears):
        raise EdgestillError("gptq_quantize_ needs a float model; this one is prepared for QAT "
                             "(finish it with quantize_(..., step='convert'))")
    check_patterns_used(config, [name for name, _ in linears])
    tied = tied_embeddings(model)

    targets = {}  # name -> (Linear, requested, stored format, fallback reason)
    for name, linear in linears:
        requested = config.format_for(name)
        if requested is not None and id(linear.weight) not in tied:  # a tied lm_head is left to RTN
            targets[name] = (linear, requested, *resolve_format(requested, linear.in_features))
    for name, (_, _, fmt, _) in targets.items():  # before any calibration pass
        if not format_spec(fmt).gptq:
            raise EdgestillError(f"GPTQ has no quantizer for {fmt!r} ({name}); it takes "
                                 f"{', '.join(format_names(gptq=True))}")

    device = next(model.parameters()).device
    batches = [(b if b.dim() == 2 else b[None]).to(device) for b in calibration]  # (B, T)
    was_training = model.training
    model.eval()
    try:
        done = _run_gptq(model, targets, batches, damp, block_columns, act_order, show_progress)
    finally:
        model.train(was_training)

    rest = quantize_(model, dataclasses.replace(config, skip=[*config.skip, *done]), step="convert")
    report = {r.name: r for r in rest}
    for name in done:
        linear, requested, fmt, fallback = targets[name]
        shape = (linear.out_features, linear.in_features)
        report[name] = LayerReport(name, shape, requested, fmt, fallback, fmt.weight_bytes(shape))
    return [report[name] for name, _ in linears if name in report]


def _quantize_linears(targets: dict, names: list[str], hessians: dict, damp: float, block_columns: int,
                      act_order: bool) -> None:
    for name in names:
        linear, _, fmt, _ = targets[name]
        w_hat = gptq_weight(linear.weight, hessians.pop(name), fmt, damp, block_columns, act_order)
        linear.weight.copy_(w_hat)


def _run_gptq(model, targets, batches, damp, block_columns, act_order, show_progress) -> list[str]:
    """GPTQ the targeted Linears of the decoder layers (or all, in one pass); return their names."""
    found = _decoder_layers(model, targets)
    if found is None:  # no layer stack: every Linear's inputs from one pass of the float model
        names = list(targets)
        hessians = _accumulate_hessians({n: targets[n][0] for n in names},
                                        lambda: [_forward(model, b) for b in batches])
        _quantize_linears(targets, names, hessians, damp, block_columns, act_order)
        return names

    stack_name, layers = found
    hidden, calls, second_input = _capture_layer_calls(model, layers, batches)
    if second_input is not None:
        out = _call_layer(layers[0], hidden[0], calls[0][0])
        if out.shape != second_input.shape or not torch.allclose(out, second_input, rtol=1e-4, atol=1e-5):
            raise EdgestillError(f"GPTQ: the input of {stack_name}.1 is not the output of {stack_name}.0; "
                                 "sequential calibration does not apply to this architecture")
    done = []
    bar = progress_bar(total=len(layers), desc="GPTQ", unit="layer", disable=not show_progress)
    for index, layer in enumerate(layers):
        prefix = f"{stack_name}.{index}." if stack_name else f"{index}."
        names = [n for n in targets if n.startswith(prefix)]
        if names:
            hessians = _accumulate_hessians(
                {n: targets[n][0] for n in names},
                lambda: [_call_layer(layer, h, call) for h, call in zip(hidden, calls[index])])
            _quantize_linears(targets, names, hessians, damp, block_columns, act_order)
            done += names
        hidden = [_call_layer(layer, h, call) for h, call in zip(hidden, calls[index])]  # quantized outputs
        bar.update(1)
    bar.close()
    return done
