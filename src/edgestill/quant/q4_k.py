"""GGUF Q4_K: llama.cpp's most used weight format, quantized here because the `gguf` package only reads it.

A Q4_K super-block holds 256 weights of one row as 8 sub-blocks of 32. Each sub-block has a
4-bit code per weight, a 6-bit scale `sc` and a 6-bit min `m`; the super-block has fp16 `d` and
`dmin`. A weight is `(d * sc) * q - (dmin * m)`, 144 bytes per 256 weights = 4.5 bits per weight.

What was reconstructed: llama.cpp's `quantize_row_q4_K_ref` (ggml/src/ggml-quants.c, the
quantizer `llama-quantize` uses without an importance matrix) and its `make_qkx2_quants`
(nmax 15, rmin -1, rdelta 0.1, nstep 20): per sub-block, a weighted least-squares fit of scale
and min over 21 candidate grid stretches, weights `sqrt(mean(x^2)) + |x|`, where an accepted
step's min carries into the steps after it (a quirk of the C loop, kept); then the 8 scales and
8 mins are quantized to 6 bits against the super-block maxima, and the codes recomputed from the
quantized scales. Every float32 operation is reproduced, including the order of each sum (C's
left-to-right loops) and a correctly rounded sqrtf, so the bytes equal those of a float32
line-by-line port of the C code (tests/quant/test_formats.py holds one). A compiled llama.cpp
may still differ in rare near-ties: with `-march=native` the C compiler may fuse `a*b + c` into
one FMA, which no portable Python can mirror. The contract that matters holds exactly:
`gguf.quants.dequantize` of `pack_q4_k(w)` equals `fake_quant_q4_k(w)`, since both come from
the same codes.

Cost: the search is vectorised over sub-blocks but not free, about 3 us per weight on one CPU
core (the cheap 32-block formats are ~50x faster); QAT with Q4_K on big layers wants a GPU.
Exactness is promised on CPU; elsewhere the arithmetic is the same but not checked bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256  # weights per super-block
SUB = 32  # weights per sub-block
TYPE_SIZE = 144  # bytes per super-block: d, dmin (fp16), 12 bytes of 6-bit scales/mins, 128 bytes of codes
_NMAX = 15
_RMIN, _RDELTA, _NSTEP = -1.0, 0.1, 20  # make_qkx2_quants' search grid, as quantize_row_q4_K_ref calls it


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _sum_in_order(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim left to right, as C's `for (i...) s += t[i]` (float32 sums depend on order)."""
    total = t[..., 0]
    for i in range(1, t.shape[-1]):
        total = total + t[..., i]
    return total


def _candidates(x, weights, sum_w, sum_x, lo, hi):
    """The 21 search steps of each sub-block at its current min `lo`.

    Returns scale, min, error (A, 21) and codes (A, 21, 32).
    """
    steps = _f32(_RMIN, x) + _f32(_RDELTA, x) * torch.arange(_NSTEP + 1, device=x.device, dtype=torch.float32)
    steps = steps + _f32(_NMAX, x)  # (21,)  C's (rmin + rdelta*is) + nmax, in float32
    iscale = steps / (hi - lo)[:, None]  # (A, 21)
    codes = torch.round(iscale[..., None] * (x - lo[:, None])[:, None, :]).clamp(0, _NMAX)  # (A, 21, 32)
    w, xs = weights[:, None, :], x[:, None, :]
    wl = w * codes
    sum_l, sum_l2, sum_xl = _sum_in_order(torch.stack([wl, wl * codes, wl * xs]))  # 3 x (A, 21), one loop
    sum_w, sum_x = sum_w[:, None], sum_x[:, None]
    det = sum_w * sum_l2 - sum_l * sum_l
    scale = (sum_w * sum_xl - sum_x * sum_l) / det
    the_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
    positive = the_min > 0  # a positive min would leave 0 off the grid: refit the scale alone
    scale = torch.where(positive, sum_xl / sum_l2, scale)
    the_min = torch.where(positive, 0.0, the_min)
    err = _sum_in_order(w * (scale[..., None] * codes + the_min[..., None] - xs).square())
    err = torch.where((det > 0) & ~torch.isnan(err), err, torch.inf)  # C skips det <= 0; NaN never wins
    return scale, the_min, err, codes


def _make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor):
    """llama.cpp's make_qkx2_quants for S sub-blocks: x, weights (S, 32) -> scale, min (S,), codes (S, 32).

    The min is returned as a positive offset (a weight is about scale * L - min). The C loop keeps
    a step only if its error beats the best so far, and then *continues from that step's min*:
    later steps grid `x - min` with the new min. So steps cannot all be scored at once; each round
    scores the remaining steps of every sub-block at its current min and takes the first one that
    improves, until none does (a handful of rounds).
    """
    lo = torch.where(x.amin(-1) > 0, 0.0, x.amin(-1))  # (S,)  the grid always contains 0
    hi = x.amax(-1)
    flat = hi == lo
    sum_w = _sum_in_order(weights)
    sum_x = _sum_in_order(weights * x)

    iscale = _f32(_NMAX, x) / torch.where(flat, 1.0, hi - lo)
    scale = _f32(1.0, x) / iscale
    codes = torch.round(iscale[:, None] * (x - lo[:, None])).clamp(0, _NMAX)  # C's nearest_int: half to even
    best_err = _sum_in_order(weights * (scale[:, None] * codes + lo[:, None] - x).square())

    next_step = torch.zeros_like(lo, dtype=torch.long)
    active = (~flat).nonzero()[:, 0]
    step_ids = torch.arange(_NSTEP + 1, device=x.device)
    while active.numel():
        c_scale, c_min, c_err, c_codes = _candidates(x[active], weights[active], sum_w[active], sum_x[active],
                                                     lo[active], hi[active])
        better = (step_ids >= next_step[active, None]) & (c_err < best_err[active, None])  # (A, 21)
        found = better.any(-1)
        first = better.int().argmax(-1)[found]  # the first improving step
        active, rows = active[found], found.nonzero()[:, 0]
        best_err[active] = c_err[rows, first]
        scale[active] = c_scale[rows, first]
        lo[active] = c_min[rows, first]
        codes[active] = c_codes[rows, first]
        next_step[active] = first + 1
        active = active[next_step[active] <= _NSTEP]

    scale = torch.where(flat, 0.0, scale)
    codes = torch.where(flat[:, None], 0.0, codes)
    return scale, -lo, codes


def _six_bit(values: torch.Tensor, vmax: torch.Tensor) -> torch.Tensor:
    """Quantize the 8 scales (or mins) of each super-block to 0..63 against their maximum, as C does."""
    inv = torch.where(vmax > 0, _f32(63.0, values) / vmax, 0.0)  # (B,)
    # C stores nearest_int(...) into a uint8_t (wrapping a negative value) and then caps it at 63.
    return (torch.round(inv[:, None] * values).to(torch.int32) & 0xFF).clamp(max=63)


@torch.no_grad()
def q4_k_codes(w: torch.Tensor):
    """Quantize (rows, k*256) weights: d, dmin (B,) fp16; sc, m (B, 8) int32; codes (B, 8, 32) uint8.

    B is the number of super-blocks, in row-major order.
    """
    x = w.detach().to(torch.float32).reshape(-1, QK_K // SUB, SUB)  # (B, 8, 32)
    # float32 torch.sqrt may miss the correctly rounded sqrtf by an ulp; a float64 sqrt rounded once cannot.
    av_x = torch.sqrt((_sum_in_order(x * x) / _f32(SUB, x)).double()).float()  # (B, 8)
    weights = av_x[..., None] + x.abs()  # (B, 8, 32)
    scales, mins, codes = _make_qkx2_quants(x.reshape(-1, SUB), weights.reshape(-1, SUB))
    scales, mins, codes = scales.view(-1, 8), mins.view(-1, 8), codes.view(x.shape)  # (B, 8), (B, 8, 32)

    # The super-block maxima start from 0 in C, so an all-negative set gives +0.0 (not the max).
    max_scale = torch.where(scales.amax(-1) > 0, scales.amax(-1), 0.0)  # (B,)
    max_min = torch.where(mins.amax(-1) > 0, mins.amax(-1), 0.0)
    sc, m = _six_bit(scales, max_scale), _six_bit(mins, max_min)  # (B, 8)
    d = (max_scale / _f32(63.0, x)).to(torch.float16)
    dmin = (max_min / _f32(63.0, x)).to(torch.float16)

    # Codes are recomputed from the quantized scales; a sub-block whose scale is 0 keeps the search's codes.
    d_sub = d.float()[:, None] * sc.float()  # (B, 8)
    dm_sub = dmin.float()[:, None] * m.float()
    requant = torch.round((x + dm_sub[..., None]) / d_sub[..., None]).clamp(0, _NMAX)
    codes = torch.where(d_sub[..., None] != 0, requant, codes).to(torch.uint8)  # stored as integers: no -0.0
    return d, dmin, sc, m, codes


def dequantize_q4_k(d, dmin, sc, m, codes) -> torch.Tensor:
    """(d * sc) * q - (dmin * m), in gguf.quants' order of float32 operations. Returns (B, 256)."""
    d_sub = (d.float()[:, None] * sc.float())[..., None]  # (B, 8, 1)
    dm_sub = (dmin.float()[:, None] * m.float())[..., None]
    return (d_sub * codes.float() - dm_sub).reshape(-1, QK_K)


@torch.no_grad()
def fake_quant_q4_k(w: torch.Tensor) -> torch.Tensor:
    """Q4_K quantize -> dequantize of (rows, k*256) weights, float32, same shape."""
    return dequantize_q4_k(*q4_k_codes(w)).reshape(w.shape)


def pack_q4_k(w: torch.Tensor) -> np.ndarray:
    """The GGUF bytes of (rows, k*256) weights: uint8 (rows, k*144), block_q4_K layout.

    Per super-block: d (fp16) | dmin (fp16) | scales[12] | qs[128]. scales[0:4] hold sc[0:4] in
    their low 6 bits and the top 2 bits of sc[4:8] above; scales[4:8] likewise for m; scales[8:12]
    hold the low 4 bits of sc[4:8] (low nibble) and m[4:8] (high nibble). qs packs each 64 weights
    as 32 bytes: weight l in the low nibble of byte l, weight l+32 in its high nibble.
    """
    rows = w.shape[0]
    d, dmin, sc, m, codes = q4_k_codes(w)
    sc, m = sc.cpu().numpy().astype(np.uint8), m.cpu().numpy().astype(np.uint8)  # (B, 8)
    scales = np.empty((sc.shape[0], 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    q = codes.cpu().numpy().reshape(-1, 4, 2, SUB)  # (B, 4 pairs of sub-blocks, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, QK_K // 2)  # (B, 128)
    d_bytes = d.cpu().numpy().view(np.uint8).reshape(-1, 2)
    dmin_bytes = dmin.cpu().numpy().view(np.uint8).reshape(-1, 2)
    blocks = np.concatenate([d_bytes, dmin_bytes, scales, qs], axis=1)  # (B, 144)
    return blocks.reshape(rows, -1)
