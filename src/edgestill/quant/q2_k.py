"""GGUF Q2_K: llama.cpp's 2-bit K-quant (2.625 bits per weight), quantized as llama.cpp quantizes it.

A Q2_K super-block holds 256 weights of one row as 16 sub-blocks of 16. Each sub-block has a
2-bit code per weight and one byte holding a 4-bit scale `sc` (low nibble) and a 4-bit min `m`
(high nibble); the super-block has fp16 `d` and `dmin`. A weight is `(d * sc) * q - (dmin * m)`.
block_q2_K: scales[16] | qs[64] | d | dmin = 84 bytes per 256 weights = 2.625 bits per weight.

What was reconstructed: llama.cpp's `quantize_row_q2_K_ref` (ggml/src/ggml-quants.c), the quantizer
`llama-quantize` uses without an importance matrix (quantize_q2_K calls it when no imatrix is given).
Per sub-block, `make_qkx2_quants` with nmax 3, rmin -0.5, rdelta 0.1, nstep 15, weights |x| and
*absolute* errors (use_mad): the same least-squares search over 16 grid stretches as Q4_K's
(edgestill.quant.q4_k, shared code), where an accepted step's min carries into the steps after it.
Then the 16 scales and 16 mins are quantized to 4 bits against the super-block maxima (d = max/15,
stored fp16), and the codes recomputed from the quantized scales. Every float32 operation is
reproduced in C's order, and ggml's `nearest_int` (the 12582912 trick) bit for bit, also where its
input exceeds 2^22; the byte that holds a scale and a min is formed as C forms it (a negative
nearest_int wraps), so even degenerate blocks match.

Weights that are already Q2_K values. llama.cpp's quantizer is not idempotent: quantizing the
dequantized weights again refits many blocks (with outliers, most of them; a QAT run or GPTQ hands
the export exactly such weights). So `q2_k_codes`, which fake_quant_q2_k and pack_q2_k use, keeps a
super-block whose 256 values are already reproduced by some Q2_K encoding: where llama.cpp's result
moves a block of at most 4 distinct values per sub-block, `_grid_codes` searches for an encoding of
those values and uses it if it reproduces them bit for bit (else llama.cpp's stays). Float weights
have 16 distinct values per sub-block and never take that path, so for them the bytes are
llama.cpp's. fake_quant_q2_k is thus idempotent and an export of converted weights stores them
exactly (tests/quant/test_formats.py and test_fake_quant.py check both).

Exactness, and how it is checked (tests/quant/test_formats.py): the bytes of `pack_q2_k` equal those
of a float32 line-by-line Python port of the C code and those of llama.cpp's own
`quantize_row_q2_K_ref`, called through ctypes in the libggml-base that llama-cpp-python ships (that
build has no FMA instructions, so float32 emulation is exact; a llama.cpp built with `-march=native`
may fuse `a*b + c` into one FMA and differ in rare near-ties, which no portable Python can mirror),
and those of `llama-quantize --type Q2_K` on the tensors its mix keeps in Q2_K
(tests/export/test_gguf_export.py). `gguf.quants.dequantize` of `pack_q2_k(w)` equals
`fake_quant_q2_k(w)` bit for bit (same codes, same float32 order as gguf's dequantizer).

Cost on one CPU core: ~0.2 us per weight (a 576 x 1536 matrix in ~0.2 s; Q4_0 takes ~0.01 us);
re-encoding converted weights ~1.5 us per weight for the blocks that need it, once per export.
"""

from __future__ import annotations

import numpy as np
import torch

from edgestill.quant.q4_k import QK_K, blocks_equal, distinct_counts, f32, make_qkx2_quants, nearest_int

SUB = 16  # weights per sub-block
N_SUB = QK_K // SUB
TYPE_SIZE = 84  # scales[16], qs[64], d and dmin (fp16)
_NMAX = 3
_RMIN, _RDELTA, _NSTEP = -0.5, 0.1, 15  # make_qkx2_quants' grid, as quantize_row_q2_K_ref calls it
_Q4SCALE = 15.0


def _four_bit(values: torch.Tensor, vmax: torch.Tensor) -> torch.Tensor:
    """nearest_int(15/max * value) for each sub-block where max > 0, else 0, as int32 (B, 16)."""
    inv = f32(_Q4SCALE, values) / torch.where(vmax > 0, vmax, 1.0)  # (B,)
    levels = nearest_int(inv[:, None] * values).to(torch.int32)
    return torch.where(vmax[:, None] > 0, levels, 0)


@torch.no_grad()
def quantize_row_q2_k_ref(w: torch.Tensor):
    """llama.cpp's quantize_row_q2_K_ref of (rows, k*256) weights: d, dmin (B,) fp16; scales (B, 16) uint8
    (sc | m << 4); codes (B, 16, 16) uint8.

    B is the number of super-blocks, in row-major order.
    """
    x = w.detach().to(torch.float32).reshape(-1, N_SUB, SUB)  # (B, 16, 16)
    scales, mins, codes = make_qkx2_quants(x.reshape(-1, SUB), x.abs().reshape(-1, SUB), nmax=_NMAX, rmin=_RMIN,
                                           rdelta=_RDELTA, nstep=_NSTEP, use_mad=True)
    scales, mins, codes = scales.view(-1, N_SUB), mins.view(-1, N_SUB), codes.view(x.shape)

    # The super-block maxima start from 0 in C (scale > max_scale), so an all-negative set gives +0.0.
    max_scale = torch.where(scales.amax(-1) > 0, scales.amax(-1), 0.0)  # (B,)
    max_min = torch.where(mins.amax(-1) > 0, mins.amax(-1), 0.0)
    ls, lm = _four_bit(scales, max_scale), _four_bit(mins, max_min)  # (B, 16) int32
    # C: scales[j] = ls (stored in a uint8_t), then scales[j] |= lm << 4 (only where max_min > 0: else lm is 0)
    byte = ((ls & 0xFF) | (lm << 4)) & 0xFF
    d = (max_scale / f32(_Q4SCALE, x)).to(torch.float16)  # 0 where max_scale is 0, as C stores it
    dmin = (max_min / f32(_Q4SCALE, x)).to(torch.float16)

    # Codes are recomputed from the quantized scales; a sub-block whose scale is 0 keeps the search's codes.
    d_sub = d.float()[:, None] * (byte & 0xF).float()  # (B, 16)
    dm_sub = dmin.float()[:, None] * (byte >> 4).float()
    requant = nearest_int((x + dm_sub[..., None]) / d_sub[..., None]).clamp(0, _NMAX)
    codes = torch.where(d_sub[..., None] != 0, requant, codes).to(torch.uint8)
    return d, dmin, byte.to(torch.uint8), codes


# (code gap 1..3) x (4-bit scale 1..15): the step between two values of a sub-block, in units of d
_STEPS = sorted({gap * sc for gap in (1, 2, 3) for sc in range(1, 16)})
_MAX_DMIN = 64  # dmin candidates taken from the sub-blocks' fitted mins, per block


def _fit_sub_blocks(x: torch.Tensor, d: torch.Tensor):
    """For blocks x (p, 16, 16) and a candidate d (p,): which (scale sc, lowest code q0) reproduce each sub-block,
    and the min B that needs: fits (p, 16, 16, 4), B (p, 16, 16, 4), codes (p, 16, 16, 4, 16).

    Under sc, A = d * sc; the sub-block's lowest value u0 has code q0, so B = A * q0 - u0, then every code is
    nearest((u + B) / A) and the values (A * q) - B must come back bit for bit.
    """
    a = (d[:, None] * torch.arange(16, device=x.device, dtype=torch.float32))[:, None, :, None, None]  # (p,1,16,1,1)
    q0 = torch.arange(4, device=x.device, dtype=torch.float32)[:, None]  # (4, 1)
    u = x[:, :, None, None, :]  # (p, 16, 1, 1, 16)
    b = a * q0 - x.amin(-1)[:, :, None, None, None]  # (p, 16, 16, 4, 1)
    codes = torch.where(a != 0, nearest_int((u + b) / a).clamp(0, _NMAX), 0.0)  # (p, 16, 16, 4, 16)
    fits = blocks_equal(a * codes - b, u.expand_as(codes)) & (b[..., 0] >= 0)
    return fits, b[..., 0], codes


def _fit_mins(fits: torch.Tensor, b: torch.Tensor, dmin: torch.Tensor):
    """For candidate dmin (t, n): whether each block fits, every sub-block with some (sc, q0) whose B is dmin * m
    for a 4-bit m (exactly; dmin 0 takes B 0): whole (t, n), and fitting (t, n, 16, 64) with m (t, n, 16, 64)."""
    b, dm = b.flatten(2)[:, None], dmin[:, :, None, None]  # (t, 1, 16, 64), (t, n, 1, 1)
    m = torch.where(dm == 0, 0.0, nearest_int(b / torch.where(dm == 0, 1.0, dm)).clamp(0, 15))
    fitting = (dm * m == b) & fits.flatten(2)[:, None]
    return fitting.any(-1).all(-1), fitting, m


def _grid_codes(v: torch.Tensor):
    """An encoding (d, dmin, scales, codes as quantize_row_q2_k_ref returns them) that dequantizes to v (P, 256)
    exactly, and ok (P,): False where none was found.

    A Q2_K value is (d * sc) * q - dmin * m: a sub-block holds at most 4 values on a grid of step A = d * sc, so
    its smallest gap is d times one of _STEPS. The candidate d are the block's widest such gap over each step,
    rounded to fp16, largest first, of those under which every sub-block's smallest gap is a step too (within
    float error). For each d, every sub-block's fits (sc, lowest code) are found; dmin is tried as -(the most
    negative value) / m, 0, and then each fitted min / 15 (the sub-block with m = 15 gives llama.cpp's dmin
    exactly). Every encoding returned is checked bit for bit. It finds the encoding of blocks that llama.cpp's
    quantizer or GPTQ wrote, where the gaps show d exactly (their subtraction (A * q) - B did not round).
    """
    P = v.shape[0]
    x = v.reshape(P, N_SUB, SUB)
    srt = x.sort(-1).values
    gaps = srt[..., 1:] - srt[..., :-1]
    small = torch.where(gaps > 0, gaps, torch.inf).amin(-1)  # (P, 16) the smallest step of each sub-block
    widest = torch.where(torch.isfinite(small), small, 0.0).amax(-1)  # (P,)
    base = torch.where(widest > 0, widest, v.amax(-1).clamp(min=0))  # all sub-blocks flat: (A * q) alone
    steps = torch.tensor(_STEPS, dtype=torch.float32, device=v.device)
    d_cand = (base[:, None] / steps).half().float()  # (P, 31), largest first
    ratio = small[:, None, :] / torch.where(d_cand == 0, 1.0, d_cand)[:, :, None]  # (P, 31, 16)
    is_step = torch.zeros(int(steps.max()) + 2, dtype=torch.bool, device=v.device)
    is_step[steps.long()] = True
    near = torch.round(ratio)
    plausible = ((ratio - near).abs() <= 1e-3 * near) & is_step[near.clamp(0, is_step.numel() - 1).long()]
    plausible = (plausible | ~torch.isfinite(small)[:, None, :]).all(-1) & torch.isfinite(d_cand)  # (P, 31)
    plausible[:, 0] |= base == 0  # d = 0: every sub-block is -dmin * m
    # the plausible candidates first, in their order (largest d first)
    order = torch.sort((~plausible).int(), dim=1, stable=True).indices
    d_cand, n_plausible = d_cand.gather(1, order), plausible.sum(1)
    lowest = (-v.amin(-1)).clamp(min=0)[:, None] / torch.arange(1, 16, device=v.device, dtype=torch.float32)
    dmin_first = torch.cat([lowest, torch.zeros(P, 1, device=v.device)], 1).half().float()  # (P, 16)

    d = torch.zeros(P, dtype=torch.float16, device=v.device)
    dmin = torch.zeros_like(d)
    scales = torch.zeros((P, N_SUB), dtype=torch.uint8, device=v.device)
    codes = torch.zeros((P, N_SUB, SUB), dtype=torch.uint8, device=v.device)
    ok = torch.zeros(P, dtype=torch.bool, device=v.device)
    rows_of = torch.arange(N_SUB, device=v.device)
    for c in range(d_cand.shape[1]):
        todo = ((~ok) & (n_plausible > c)).nonzero()[:, 0]
        if not todo.numel():
            break
        dc = d_cand[todo, c]
        fits, b, q = _fit_sub_blocks(x[todo], dc)  # (t, 16, 16, 4)
        dmins = dmin_first[todo]
        whole, fitting, m = _fit_mins(fits, b, dmins)
        if not whole.any(-1).all():  # then each fitted min / 15, the distinct ones, up to _MAX_DMIN
            more = torch.where(fits, b / 15, torch.nan).flatten(1).half().float().sort(-1).values
            more = torch.where(torch.cat([torch.ones_like(more[:, :1], dtype=torch.bool),
                                          more[:, 1:] != more[:, :-1]], 1), more, torch.nan)
            more = more.sort(-1).values[:, :_MAX_DMIN]  # NaN last
            dmins = torch.cat([dmins, more], 1)
            whole, fitting, m = _fit_mins(fits, b, dmins)
        found = whole.any(-1)
        if not found.any():
            continue
        t = found.nonzero()[:, 0]
        j = whole[t].int().argmax(-1)  # the first dmin that fits
        pick = fitting[t, j].int().argmax(-1)  # (k, 16) the first (sc, q0) of each sub-block that fits
        sc, q0, k = pick // 4, pick % 4, torch.arange(t.numel(), device=v.device)[:, None]
        blk = todo[t]
        d[blk], dmin[blk] = dc[t].half(), dmins[t, j].half()
        scales[blk] = (sc | (m[t, j][k, rows_of, pick].long() << 4)).to(torch.uint8)
        codes[blk] = q[t][k, rows_of, sc, q0].to(torch.uint8)
        ok[blk] = True
    ok &= blocks_equal(dequantize_q2_k(d, dmin, scales, codes), v)  # each encoding is checked once more
    return d, dmin, scales, codes, ok


@torch.no_grad()
def q2_k_codes(w: torch.Tensor):
    """The Q2_K encoding of (rows, k*256) weights that fake_quant_q2_k and pack_q2_k use: llama.cpp's
    (quantize_row_q2_k_ref), except that a super-block whose weights are already Q2_K values (a QAT or GPTQ
    result, a converted model) keeps them exactly when _grid_codes finds their encoding, as llama.cpp's quantizer
    may not (its search refits such a block). Returns d, dmin (B,) fp16, scales (B, 16) uint8, codes (B, 16, 16).
    """
    v = w.detach().to(torch.float32).reshape(-1, QK_K)  # (B, 256)
    d, dmin, scales, codes = quantize_row_q2_k_ref(v)
    moved = ~blocks_equal(dequantize_q2_k(d, dmin, scales, codes), v)
    # At most 4 values per sub-block (its 4 codes): float weights fail this and skip the search.
    maybe = moved & (distinct_counts(v.reshape(-1, N_SUB, SUB)) <= _NMAX + 1).all(-1)
    if maybe.any():
        idx = maybe.nonzero()[:, 0]
        gd, gdmin, gscales, gcodes, ok = _grid_codes(v[idx])
        idx = idx[ok]
        d[idx], dmin[idx], scales[idx], codes[idx] = gd[ok], gdmin[ok], gscales[ok], gcodes[ok]
    return d, dmin, scales, codes


def dequantize_q2_k(d, dmin, scales, codes) -> torch.Tensor:
    """(d * sc) * q - (dmin * m), in gguf.quants' order of float32 operations. Returns (B, 256)."""
    d_sub = (d.float()[:, None] * (scales & 0xF).float())[..., None]  # (B, 16, 1)
    dm_sub = (dmin.float()[:, None] * (scales >> 4).float())[..., None]
    return (d_sub * codes.float() - dm_sub).reshape(-1, QK_K)


@torch.no_grad()
def fake_quant_q2_k(w: torch.Tensor) -> torch.Tensor:
    """Q2_K quantize -> dequantize of (rows, k*256) weights, float32, same shape."""
    return dequantize_q2_k(*q2_k_codes(w)).reshape(w.shape)


def pack_2bit(codes: np.ndarray) -> np.ndarray:
    """(B, 256) codes 0..3 -> (B, 64) bytes, as Q2_K and Q3_K store them: in each half of 128 weights,
    byte l holds weights l, l+32, l+64, l+96 in its bits 0-1, 2-3, 4-5, 6-7."""
    q = codes.astype(np.uint8).reshape(-1, 2, 4, 32)  # (B, half, shift, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, QK_K // 4)


def pack_q2_k(w: torch.Tensor) -> np.ndarray:
    """The GGUF bytes of (rows, k*256) weights: uint8 (rows, k*84), block_q2_K layout.

    Per super-block: scales[16] (sub-block j: sc in the low nibble, m in the high) | qs[64] (pack_2bit) |
    d (fp16) | dmin (fp16).
    """
    rows = w.shape[0]
    d, dmin, scales, codes = q2_k_codes(w)
    qs = pack_2bit(codes.cpu().numpy().reshape(-1, QK_K))
    d_bytes = d.cpu().numpy().view(np.uint8).reshape(-1, 2)
    dmin_bytes = dmin.cpu().numpy().view(np.uint8).reshape(-1, 2)
    blocks = np.concatenate([scales.cpu().numpy(), qs, d_bytes, dmin_bytes], axis=1)  # (B, 84)
    return blocks.reshape(rows, -1)
