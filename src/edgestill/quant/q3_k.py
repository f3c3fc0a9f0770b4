"""GGUF Q3_K: llama.cpp's 3-bit K-quant (3.4375 bits per weight), quantized as llama.cpp quantizes it.

A Q3_K super-block holds 256 weights of one row as 16 sub-blocks of 16. Each weight has a signed
3-bit code q in -4..3 (its low 2 bits in `qs`, its high bit in `hmask`, set when q >= 0); each
sub-block a signed 6-bit scale s in -32..31 (stored as s + 32, packed 16 of them in 12 bytes); the
super-block an fp16 `d`. A weight is `(d * s) * q`, with no min: the format is symmetric.
block_q3_K: hmask[32] | qs[64] | scales[12] | d = 110 bytes per 256 weights = 3.4375 bits per weight.

What was reconstructed: llama.cpp's `quantize_row_q3_K_ref` (ggml/src/ggml-quants.c), the quantizer
`llama-quantize` uses without an importance matrix (quantize_q3_K calls it when no imatrix is given),
and its `make_q3_quants(16, 4, x, L, do_rmse=true)`: per sub-block, codes from the signed
largest-magnitude value (iscale = -4 / max, so that value lands on code -4), then up to 5 passes of
coordinate descent that move one code at a time to the value that most improves the weighted
(x^2) least-squares fit `sumlx^2 / suml2`, each accepted move updating the running sums before the
next weight is tried (so the 16 weights of a sub-block are visited in order; sub-blocks run in
parallel). The sub-block scale is `sumlx / suml2`. Then the 16 scales are quantized to 6 bits
against the signed largest one (iscale = -32 / max: d is negative when that scale is positive),
d = 1/iscale stored fp16, and the codes recomputed from the quantized scales. Every float32
operation is reproduced in C's order (each `a*b*c` as (a*b)*c, each running sum left to right), and
ggml's `nearest_int` (the 12582912 trick) bit for bit, also where its input exceeds 2^22. A
sub-block below GROUP_MAX_EPS (1e-15) is all zero; a sub-block whose quantized scale is 0 keeps the
search's codes (they decide only the sign of the zeros it dequantizes to, which is kept too).

Weights that are already Q3_K values. llama.cpp's quantizer is not idempotent: quantizing the
dequantized weights again refits about half of the blocks (a QAT run or GPTQ hands the export exactly
such weights). So `q3_k_codes`, which fake_quant_q3_k and pack_q3_k use, keeps a super-block whose
256 values are already reproduced by some Q3_K encoding: every Q3_K value is an exact product d * s * q,
so `_grid_codes` finds such an encoding whenever one exists (see there) and checks it bit for bit.
Float weights have more than 8 distinct values per sub-block and never take that path, so for them
the bytes are llama.cpp's. fake_quant_q3_k is thus idempotent and an export of converted weights
stores them exactly.

Exactness, and how it is checked (tests/quant/test_formats.py): the bytes of `pack_q3_k` equal those
of a float32 line-by-line Python port of the C code and those of llama.cpp's own
`quantize_row_q3_K_ref`, called through ctypes in the libggml-base that llama-cpp-python ships (that
build has no FMA instructions, so float32 emulation is exact; a llama.cpp built with `-march=native`
may fuse `a*b + c` into one FMA and differ in rare near-ties, which no portable Python can mirror),
and those of `llama-quantize --type Q3_K_S` (tests/export/test_gguf_export.py).
`gguf.quants.dequantize` of `pack_q3_k(w)` equals `fake_quant_q3_k(w)` bit for bit.

Cost on one CPU core: ~0.1 us per weight (a 576 x 1536 matrix in ~0.1 s; Q4_0 takes ~0.01 us);
re-encoding converted weights ~0.5 us per weight, once per export.
"""

from __future__ import annotations

import numpy as np
import torch

from edgestill.quant.q2_k import pack_2bit
from edgestill.quant.q4_k import QK_K, blocks_equal, distinct_counts, f32, nearest_int

SUB = 16  # weights per sub-block
N_SUB = QK_K // SUB
TYPE_SIZE = 110  # hmask[32], qs[64], scales[12], d (fp16)
_NMAX = 4  # codes -4..3
_GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a sub-block whose largest |x| is below this is all zero
_TRIES = 5


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last dim, sign kept, first one on ties (C's `ax > amax`)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]


def _make_q3_quants(x: torch.Tensor):
    """make_q3_quants(16, 4, x, L, true) for S sub-blocks: x (S, 16) -> scale (S,), codes L + 4 (S, 16) in 0..7.

    Laid out (16, S) so that each step reads contiguous rows; each pass runs only on the sub-blocks the pass
    before changed (one with no change would repeat that pass exactly: C breaks out of its loop there).
    """
    amax = x.abs().amax(-1)  # (S,)
    zero = amax < f32(_GROUP_MAX_EPS, x)
    top = _signed_absmax(x)
    iscale = f32(-_NMAX, x) / torch.where(zero, 1.0, top)  # (S,)
    xt = x.T.contiguous()  # (16, S)
    levels = nearest_int(iscale * xt).clamp(-_NMAX, _NMAX - 1)  # (16, S) float32 integers
    w = xt * xt
    wx = w * xt
    sumlx = torch.zeros_like(amax)
    suml2 = torch.zeros_like(amax)
    for i in range(SUB):  # C's running sums, left to right from 0
        sumlx = sumlx + wx[i] * levels[i]
        suml2 = suml2 + w[i] * levels[i] * levels[i]
    active = torch.arange(x.shape[0], device=x.device)
    for _ in range(_TRIES):
        xa, wa, wxa, la = xt[:, active], w[:, active], wx[:, active], levels[:, active]
        sx, s2 = sumlx[active], suml2[active]
        changed = torch.zeros_like(sx, dtype=torch.bool)
        for i in range(SUB):
            li = la[i]
            slx = sx - wxa[i] * li  # the sums without weight i
            sl2 = s2 - wa[i] * li * li
            tried = slx > 0  # C tries a new code only then
            new = nearest_int(xa[i] * sl2 / torch.where(tried, slx, 1.0)).clamp(-_NMAX, _NMAX - 1)
            slx = slx + wxa[i] * new
            sl2 = sl2 + wa[i] * new * new
            take = tried & (new != li) & (sl2 > 0) & (slx * slx * s2 > sx * sx * sl2)
            la[i] = torch.where(take, new, li)
            sx = torch.where(take, slx, sx)
            s2 = torch.where(take, sl2, s2)
            changed |= take
        levels[:, active], sumlx[active], suml2[active] = la, sx, s2
        active = active[changed]
        if not active.numel():
            break
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    scale = torch.where(zero, 0.0, scale)
    codes = torch.where(zero[:, None], 0.0, levels.T + _NMAX)  # the all-zero branch leaves L at 0, not at 4
    return scale, codes


@torch.no_grad()
def quantize_row_q3_k_ref(w: torch.Tensor):
    """llama.cpp's quantize_row_q3_K_ref of (rows, k*256) weights: d (B,) fp16; scales (B, 16) int32 in 0..63
    (s + 32); codes (B, 16, 16) uint8 in 0..7 (q + 4).

    B is the number of super-blocks, in row-major order.
    """
    x = w.detach().to(torch.float32).reshape(-1, N_SUB, SUB)  # (B, 16, 16)
    scales, codes = _make_q3_quants(x.reshape(-1, SUB))
    scales, codes = scales.view(-1, N_SUB), codes.view(x.shape)  # (B, 16), (B, 16, 16)

    max_scale = _signed_absmax(scales)  # (B,); +-0.0 when every scale is 0, as C's loop leaves it (amax starts at 0)
    has = max_scale != 0
    iscale = f32(-32.0, x) / torch.where(has, max_scale, 1.0)
    level = nearest_int(iscale[:, None] * scales).to(torch.int32)
    level = ((level + 128) & 0xFF) - 128  # C stores nearest_int(...) into an int8_t
    sc = torch.where(has[:, None], level.clamp(-32, 31) + 32, 0)  # (B, 16) the stored 6-bit values; memset 0 else
    d = torch.where(has, torch.ones_like(iscale) / iscale, 0.0).to(torch.float16)

    # Codes are recomputed from the quantized scales; a sub-block whose scale is 0 keeps the search's codes.
    d_sub = d.float()[:, None] * (sc - 32).float()  # (B, 16)
    requant = nearest_int(x / d_sub[..., None]).clamp(-_NMAX, _NMAX - 1) + _NMAX
    codes = torch.where(d_sub[..., None] != 0, requant, codes).to(torch.uint8)
    return d, sc, codes


# |s * q| for a 6-bit scale s in -32..31 and a code q in -4..3: what a dequantized weight is, in units of d.
_PRODUCTS = sorted({s * q for s in range(1, 33) for q in range(1, 5)})
_GRID_CHUNK = 1024  # (block, d) pairs checked at once: 1024 x 16 x 9 x 16 values


def _grid_codes(v: torch.Tensor):
    """An encoding (d, scales, codes as quantize_row_q3_k_ref returns them) that dequantizes to v (P, 256) exactly,
    and ok (P,): False where none was found.

    Every Q3_K value is an exact float32 product d * s * q (11 + 6 + 3 significant bits at most), so the value of
    largest magnitude is d times an integer k = s * q with |k| <= 128: d is one of top / k, of those exact in fp16.
    For each such d (|k| = 128 first: llama.cpp puts a block's largest value there), each sub-block takes the first
    s whose codes (nearest, or for s * d = 0 the one that gives the sign of each zero) reproduce its 16 values bit
    for bit, s from kmax / q for q in +-1..4 (kmax: its largest value over d) or 0. An all-zero block takes d = 0.
    So the search finds an encoding of every block that is the dequantization of some Q3_K block.
    """
    P = v.shape[0]
    x = v.reshape(P, N_SUB, SUB)
    top = _signed_absmax(v)  # (P,)
    ks = torch.tensor(_PRODUCTS[::-1], dtype=torch.float32, device=v.device)
    ks = torch.stack([ks, -ks], 1).flatten()  # (n,) 128, -128, 127, ...: llama.cpp puts the largest value on s*q = 128
    cand = top[:, None] / ks  # (P, n)
    exact = (cand.half().float() == cand) & (cand * ks == top[:, None]) & (cand != 0)
    block, which = exact.nonzero(as_tuple=True)
    dvals = cand[block, which]
    zero = (top == 0).nonzero()[:, 0]  # all-zero blocks (of either sign): d = 0 and s = 0 give any zeros
    block = torch.cat([block, zero])
    dvals = torch.cat([dvals, torch.zeros_like(zero, dtype=torch.float32)])
    ratio = v[block] / torch.where(dvals == 0, 1.0, dvals)[:, None]  # every value must be d times an integer
    keep = ((ratio == torch.round(ratio)) & (ratio.abs() <= 128)).all(-1) | (dvals == 0)
    block, dvals = block[keep], dvals[keep]
    order = torch.sort(block, stable=True).indices  # by block, each block's candidates in the order above
    block, dvals = block[order], dvals[order]
    starts = torch.searchsorted(block, block, right=False)
    rank = torch.arange(block.numel(), device=v.device) - starts  # a block's first candidate, second, ...

    d = torch.zeros(P, dtype=torch.float16, device=v.device)
    sc = torch.full((P, N_SUB), 32, dtype=torch.int32, device=v.device)
    codes = torch.full((P, N_SUB, SUB), _NMAX, dtype=torch.uint8, device=v.device)
    ok = torch.zeros(P, dtype=torch.bool, device=v.device)
    q_all = torch.tensor([-4.0, -3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 4.0], device=v.device)
    for r in range(int(rank.max()) + 1 if rank.numel() else 0):  # every block's first candidate, then second, ...
        sel = ((rank == r) & ~ok[block]).nonzero()[:, 0]
        for start in range(0, sel.numel(), _GRID_CHUNK):
            b, dv = block[sel[start:start + _GRID_CHUNK]], dvals[sel[start:start + _GRID_CHUNK]]
            xs = x[b]  # (p, 16, 16)
            k = torch.round(xs / torch.where(dv == 0, 1.0, dv)[:, None, None])  # integers s * q (checked above)
            kmax = _signed_absmax(k)  # (p, 16): s * q of the sub-block's largest value: s is kmax / q
            s_try = torch.cat([kmax[..., None] / q_all, torch.zeros_like(kmax)[..., None]], -1)  # (p, 16, 9)
            fit = (s_try == torch.round(s_try)) & (s_try >= -32) & (s_try <= 31)
            s_try = torch.where(fit, s_try, 0.0) + 0.0  # + 0.0: no -0.0 (a stored s of 0 is +0)
            dl = (dv[:, None, None] * s_try)[..., None]  # (p, 16, 9, 1) exact: d is fp16, s has 6 bits
            xs = xs[:, :, None, :]
            q = nearest_int(xs / dl).clamp(-_NMAX, _NMAX - 1)
            signs = torch.where(torch.signbit(xs) == torch.signbit(dl), 0.0, -1.0)  # s * d = +-0: q signs each 0
            q = torch.where(dl == 0, signs, q)  # (p, 16, 9, 16)
            match = blocks_equal(dl * q, xs.expand_as(q))  # (p, 16, 9)
            i = match.any(-1).all(-1).nonzero()[:, 0]  # one candidate per block in this round
            if not i.numel():
                continue
            first = match[i].int().argmax(-1)  # (k, 16) the first s that fits each sub-block
            q_best = q[i].gather(2, first[:, :, None, None].expand(-1, -1, 1, SUB))[:, :, 0]  # (k, 16, 16)
            d[b[i]] = dv[i].half()
            sc[b[i]] = s_try[i].gather(2, first[..., None])[..., 0].int() + 32
            codes[b[i]] = (q_best + _NMAX).to(torch.uint8)
            ok[b[i]] = True
    ok &= blocks_equal(dequantize_q3_k(d, sc, codes), v)  # each encoding is checked once more
    return d, sc, codes, ok


@torch.no_grad()
def q3_k_codes(w: torch.Tensor):
    """The Q3_K encoding of (rows, k*256) weights that fake_quant_q3_k and pack_q3_k use: llama.cpp's
    (quantize_row_q3_k_ref), except that a super-block whose weights are already Q3_K values (a QAT or GPTQ
    result, a converted model) keeps them exactly, as llama.cpp's quantizer may not: its search refits such a
    block (~half of them). So fake_quant_q3_k is idempotent and an export of converted weights stores them as
    they are. Returns d (B,) fp16, scales (B, 16) int32, codes (B, 16, 16) uint8, as quantize_row_q3_k_ref.
    """
    v = w.detach().to(torch.float32).reshape(-1, QK_K)  # (B, 256)
    d, sc, codes = quantize_row_q3_k_ref(v)
    moved = ~blocks_equal(dequantize_q3_k(d, sc, codes), v)
    # At most 8 values per sub-block (its 8 codes): float weights fail this and skip the search.
    maybe = moved & (distinct_counts(v.reshape(-1, N_SUB, SUB)) <= 2 * _NMAX).all(-1)
    if maybe.any():
        idx = maybe.nonzero()[:, 0]
        gd, gsc, gcodes, ok = _grid_codes(v[idx])
        idx = idx[ok]
        d[idx], sc[idx], codes[idx] = gd[ok], gsc[ok], gcodes[ok]
    return d, sc, codes


def dequantize_q3_k(d, scales, codes) -> torch.Tensor:
    """(d * s) * q with s = scale - 32, q = code - 4, in gguf.quants' order of float32 operations. Returns (B, 256)."""
    dl = (d.float()[:, None] * (scales - 32).float())[..., None]  # (B, 16, 1)
    return (dl * (codes.float() - _NMAX)).reshape(-1, QK_K)


@torch.no_grad()
def fake_quant_q3_k(w: torch.Tensor) -> torch.Tensor:
    """Q3_K quantize -> dequantize of (rows, k*256) weights, float32, same shape."""
    return dequantize_q3_k(*q3_k_codes(w)).reshape(w.shape)


def pack_q3_k(w: torch.Tensor) -> np.ndarray:
    """The GGUF bytes of (rows, k*256) weights: uint8 (rows, k*110), block_q3_K layout.

    Per super-block: hmask[32] (weight j's high code bit in bit j // 32 of byte j % 32) | qs[64] (the low
    2 bits, as q2_k.pack_2bit) | scales[12] (the 6-bit values of sub-blocks j < 8 in the low nibbles of
    bytes 0-7, of j >= 8 in their high nibbles; bits 4-5 of sub-block j in bits 2*(j // 4) of byte
    8 + j % 4) | d (fp16).
    """
    rows = w.shape[0]
    d, sc, codes = q3_k_codes(w)
    codes = codes.cpu().numpy().reshape(-1, QK_K)  # (B, 256) in 0..7
    high = (codes >> 2).reshape(-1, 8, 32)  # (B, bit, byte)
    hmask = np.zeros((codes.shape[0], 32), dtype=np.uint8)
    for bit in range(8):
        hmask |= (high[:, bit] << bit).astype(np.uint8)
    qs = pack_2bit(codes & 3)
    sc = sc.cpu().numpy().astype(np.uint8)  # (B, 16) in 0..63
    scales = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    scales[:, 0:8] = (sc[:, :8] & 0xF) | ((sc[:, 8:] & 0xF) << 4)
    for j in range(N_SUB):
        scales[:, 8 + j % 4] |= (sc[:, j] >> 4) << (2 * (j // 4))
    d_bytes = d.cpu().numpy().view(np.uint8).reshape(-1, 2)
    blocks = np.concatenate([hmask, qs, scales, d_bytes], axis=1)  # (B, 110)
    return blocks.reshape(rows, -1)
