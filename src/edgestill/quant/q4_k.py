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
left-to-right loops), a correctly rounded sqrtf and ggml's `nearest_int` (the 12582912 trick, bit
for bit, also where its input exceeds 2^22), so the bytes equal those of a float32 line-by-line port
of the C code (tests/quant/test_formats.py holds one) and those of llama.cpp's own
`quantize_row_q4_K_ref` in the libggml-base that llama-cpp-python ships, called through ctypes
(that build has no FMA instructions). A llama.cpp built with `-march=native` may still differ in
rare near-ties: the C compiler may then fuse `a*b + c` into one FMA, which no portable Python can
mirror. The contract that matters holds exactly: `gguf.quants.dequantize` of `pack_q4_k(w)` equals
`fake_quant_q4_k(w)`, since both come from the same codes.

The search helpers here (`make_qkx2_quants`, `nearest_int`, `f32`) are shared with Q2_K (q2_k.py)
and Q3_K (q3_k.py). The search runs its steps one after the other, as C does, each step for every
sub-block of the weight at once.

Cost: about 0.2 us per weight on one CPU core (a 576 x 1536 matrix in ~0.2 s; Q4_0 takes ~0.01 us;
the search took ~3 us before it ran step by step over all sub-blocks). Exactness is promised on CPU;
elsewhere the arithmetic is the same but not checked bit for bit. Unlike q3_k.py and q2_k.py, weights
that already hold Q4_K values are not kept: llama.cpp's search refits some of their blocks.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256  # weights per super-block
SUB = 32  # weights per sub-block
TYPE_SIZE = 144  # bytes per super-block: d, dmin (fp16), 12 bytes of 6-bit scales/mins, 128 bytes of codes
_NMAX = 15
_RMIN, _RDELTA, _NSTEP = -1.0, 0.1, 20  # make_qkx2_quants' search grid, as quantize_row_q4_K_ref calls it


def f32(value: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 scalar on `like`'s device: a C float constant (a Python float would be a double)."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _sum_in_order(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim left to right, as C's `for (i...) s += t[i]` (float32 sums depend on order)."""
    total = t[..., 0]
    for i in range(1, t.shape[-1]):
        total = total + t[..., i]
    return total


def _sum_rows(t: torch.Tensor) -> torch.Tensor:
    """Sum over the first dim in order (the same sum as _sum_in_order, for data laid out (n, ...))."""
    total = t[0]
    for i in range(1, t.shape[0]):
        total = total + t[i]
    return total


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int, bit for bit, as float32: `(bits of (v + 12582912.f)) & 0x7fffff) - 0x400000`.

    Round half to even for |v| < 2^22 (torch.round there); beyond, the same wrapped integer the C trick gives.
    """
    bits = (v.to(torch.float32) + f32(12582912.0, v)).view(torch.int32)
    return ((bits & 0x7FFFFF) - 0x400000).to(torch.float32)


def distinct_counts(x: torch.Tensor) -> torch.Tensor:
    """How many different float32 values (bit patterns: -0.0 is not +0.0) each row of the last dim holds."""
    bits = x.contiguous().view(torch.int32).sort(-1).values
    return 1 + (bits[..., 1:] != bits[..., :-1]).sum(-1)


def blocks_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) whether the float32 blocks (B, n) of a and b are equal bit for bit (the sign of zero too)."""
    return (a.contiguous().view(torch.int32) == b.contiguous().view(torch.int32)).all(-1)


def _errors(diff: torch.Tensor, use_mad: bool) -> torch.Tensor:
    return diff.abs() if use_mad else diff.square()


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax=_NMAX, rmin=_RMIN, rdelta=_RDELTA,
                      nstep=_NSTEP, use_mad=False):
    """llama.cpp's make_qkx2_quants for S sub-blocks: x, weights (S, n) -> scale, min (S,), codes (S, n).

    The defaults are Q4_K's call (nmax 15, rmin -1, rdelta 0.1, nstep 20, squared errors); Q2_K (q2_k.py)
    calls it with nmax 3, rmin -0.5, rdelta 0.1, nstep 15 and absolute errors (use_mad).

    The min is returned as a positive offset (a weight is about scale * L - min). The C loop keeps
    a step only if its error beats the best so far, and then *continues from that step's min*:
    later steps grid `x - min` with the new min. So the steps run one after the other, as in C,
    each one for all sub-blocks at once. The work is laid out (n, S) so that every in-order sum
    adds contiguous rows.
    """
    xt, wt = x.T.contiguous(), weights.T.contiguous()  # (n, S)
    lo = torch.where(x.amin(-1) > 0, 0.0, x.amin(-1))  # (S,)  the grid always contains 0
    hi = x.amax(-1)
    flat = hi == lo
    sum_w = _sum_rows(wt)
    sum_x = _sum_rows(wt * xt)

    iscale = f32(nmax, x) / torch.where(flat, 1.0, hi - lo)
    scale = f32(1.0, x) / iscale
    codes = nearest_int(iscale * (xt - lo)).clamp(0, nmax)  # (n, S)
    best_err = _sum_rows(wt * _errors(scale * codes + lo - xt, use_mad))

    for step in range(nstep + 1):
        stretch = (f32(rmin, x) + f32(rdelta, x) * f32(step, x)) + f32(nmax, x)  # C's rmin + rdelta*is + nmax
        c = nearest_int(stretch / (hi - lo) * (xt - lo)).clamp(0, nmax)  # at the current min
        wl = wt * c
        sum_l, sum_l2, sum_xl = _sum_rows(torch.stack([wl, wl * c, wl * xt], 1))  # 3 x (S,), one loop
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0  # a positive min would leave 0 off the grid: refit the scale alone
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, 0.0, this_min)
        err = _sum_rows(wt * _errors(this_scale * c + this_min - xt, use_mad))
        better = ~flat & (det > 0) & (err < best_err)  # C skips det <= 0; a NaN error never wins
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
        codes = torch.where(better, c, codes)

    scale = torch.where(flat, 0.0, scale)
    codes = torch.where(flat, 0.0, codes)
    return scale, -lo, codes.T


def _six_bit(values: torch.Tensor, vmax: torch.Tensor) -> torch.Tensor:
    """Quantize the 8 scales (or mins) of each super-block to 0..63 against their maximum, as C does."""
    inv = torch.where(vmax > 0, f32(63.0, values) / vmax, 0.0)  # (B,)
    # C stores nearest_int(...) into a uint8_t (wrapping a negative value) and then caps it at 63.
    return (torch.round(inv[:, None] * values).to(torch.int32) & 0xFF).clamp(max=63)


@torch.no_grad()
def q4_k_codes(w: torch.Tensor):
    """Quantize (rows, k*256) weights: d, dmin (B,) fp16; sc, m (B, 8) int32; codes (B, 8, 32) uint8.

    B is the number of super-blocks, in row-major order.
    """
    x = w.detach().to(torch.float32).reshape(-1, QK_K // SUB, SUB)  # (B, 8, 32)
    # float32 torch.sqrt may miss the correctly rounded sqrtf by an ulp; a float64 sqrt rounded once cannot.
    av_x = torch.sqrt((_sum_in_order(x * x) / f32(SUB, x)).double()).float()  # (B, 8)
    weights = av_x[..., None] + x.abs()  # (B, 8, 32)
    scales, mins, codes = make_qkx2_quants(x.reshape(-1, SUB), weights.reshape(-1, SUB))
    scales, mins, codes = scales.view(-1, 8), mins.view(-1, 8), codes.view(x.shape)  # (B, 8), (B, 8, 32)

    # The super-block maxima start from 0 in C, so an all-negative set gives +0.0 (not the max).
    max_scale = torch.where(scales.amax(-1) > 0, scales.amax(-1), 0.0)  # (B,)
    max_min = torch.where(mins.amax(-1) > 0, mins.amax(-1), 0.0)
    sc, m = _six_bit(scales, max_scale), _six_bit(mins, max_min)  # (B, 8)
    d = (max_scale / f32(63.0, x)).to(torch.float16)
    dmin = (max_min / f32(63.0, x)).to(torch.float16)

    # Codes are recomputed from the quantized scales; a sub-block whose scale is 0 keeps the search's codes.
    d_sub = d.float()[:, None] * sc.float()  # (B, 8)
    dm_sub = dmin.float()[:, None] * m.float()
    requant = nearest_int((x + dm_sub[..., None]) / d_sub[..., None]).clamp(0, _NMAX)
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
