"""Parity: our fake-quant equals what the runtimes store, bit for bit (atol=0, sign of zero included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from edgestill.errors import EdgestillError
from edgestill.quant import (
    GGUFF16,
    GGUFQ2_K,
    GGUFQ3_K,
    GGUFQ4_0,
    GGUFQ4_1,
    GGUFQ4_K,
    GGUFQ5_0,
    GGUFQ5_1,
    GGUFQ8_0,
    Int4Block,
    Int8PerChannel,
    format_by_name,
    format_spec,
    gguf_quantize,
    int8_per_channel_codes,
    pack_matmul_nbits,
    resolve_format,
)

LEGACY = [GGUFQ8_0(), GGUFQ4_0(), GGUFQ4_1(), GGUFQ5_0(), GGUFQ5_1(), GGUFF16()]
K_QUANTS = [GGUFQ4_K(), GGUFQ3_K(), GGUFQ2_K()]
BELOW_4 = [GGUFQ3_K(), GGUFQ2_K()]
F32 = np.float32


def assert_bits_equal(ours: torch.Tensor, ref) -> None:
    ref = torch.as_tensor(np.asarray(ref, dtype=np.float32)).reshape(ours.shape)
    assert ours.dtype == torch.float32
    differ = (ours.view(torch.int32) != ref.view(torch.int32)).sum().item()
    assert differ == 0, f"{differ} of {ours.numel()} differ; max |diff| {(ours - ref).abs().max().item()}"


def make_weight(kind: str, rows: int = 32, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Weights that exercise every branch of the block quantizers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    if kind == "outliers":
        w.view(-1)[torch.randint(0, w.numel(), (w.numel() // 50,), generator=g)] *= 80
    elif kind == "zero_blocks":
        w[::2, :32] = 0
        w[1::4] = 0  # whole rows, so K-quant super-blocks are all zero too
    elif kind == "constant_blocks":
        w[0::3, :64] = 0.25
        w[1::3, 64:128] = -0.125
        w[2::3, 32:64] = 3.0
    elif kind == "negative_max":
        w[:, ::32] = -w.abs().amax() * 2  # each block's largest magnitude is negative
    elif kind == "ties":
        w[:, 0::32], w[:, 1::32] = 0.5, -0.5  # +a and -a: the first one decides the sign
    elif kind == "halves":  # codes land exactly on .5: trunc(x + 8.5) and round-half-away must be used
        k = torch.randint(-8, 7, (rows, cols), generator=g).float() + 0.5
        w = k / 8
        w[0::2, ::32] = -1.0  # Q4_0: d = 1/8 exactly
        w[1::2] = (torch.randint(-127, 127, (rows // 2, cols), generator=g).float() + 0.5) / 128
        w[1::2, ::32] = 127 / 128  # Q8_0: d = 1/128 exactly
    elif kind == "tiny":
        w *= 1e-5  # scales become fp16 subnormals
    elif kind == "one_sign":
        w = w.abs()
        w[::2] = -w[::2]
    return w


KINDS = ["normal", "outliers", "zero_blocks", "constant_blocks", "negative_max", "ties", "halves", "tiny",
         "one_sign"]


def gguf_roundtrip(w: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    return quants.dequantize(quants.quantize(w.numpy(), qtype), qtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", LEGACY, ids=lambda f: f.ggml_type)
def test_legacy_gguf_fake_quant_equals_gguf_reference(fmt, kind):
    w = make_weight(kind)
    assert_bits_equal(fmt.fake_quant(w), gguf_roundtrip(w, GGMLQuantizationType[fmt.ggml_type]))


@pytest.mark.parametrize("fmt", LEGACY + K_QUANTS, ids=lambda f: f.ggml_type)
def test_gguf_bytes_sizes_and_roundtrip(fmt):
    w = make_weight("normal", rows=8, cols=512)
    qtype = GGMLQuantizationType[fmt.ggml_type]
    data, got_qtype = gguf_quantize(w, fmt)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    assert got_qtype == qtype and fmt.block_size == block_size
    assert fmt.bits_per_weight == 8 * type_size / block_size
    assert data.nbytes == fmt.weight_bytes(tuple(w.shape)) == 8 * 512 * fmt.bits_per_weight / 8
    assert_bits_equal(fmt.fake_quant(w), quants.dequantize(data, qtype))


def test_bits_per_weight_table():
    got = {f.ggml_type: f.bits_per_weight for f in LEGACY + K_QUANTS}
    assert got == {"Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "F16": 16.0, "Q4_K": 4.5,
                   "Q3_K": 3.4375, "Q2_K": 2.625}


# --- Q4_K -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_q4_k_bytes_dequantized_by_gguf_equal_fake_quant(kind):
    w = make_weight(kind, rows=16, cols=512)
    data, qtype = gguf_quantize(w, GGUFQ4_K())
    assert data.dtype == np.uint8 and data.shape == (16, 2 * 144)
    assert_bits_equal(GGUFQ4_K().fake_quant(w), quants.dequantize(data, qtype))


def _nearest_int(v) -> int:
    return int(np.rint(v))  # llama.cpp's nearest_int: round half to even


def _nearest_int_ggml(v) -> int:
    """ggml's nearest_int exactly: the low mantissa bits of (v + 12582912.f), also for |v| >= 2^22."""
    i = int(np.array([np.float32(v) + F32(12582912.0)], dtype=np.float32).view(np.int32)[0])
    return (i & 0x007FFFFF) - 0x00400000


def _make_qkx2_quants_port(x, weights, nmax=15, rmin=F32(-1), rdelta=F32(0.1), nstep=20, use_mad=False,
                           nearest=_nearest_int):
    """make_qkx2_quants (ggml-quants.c), line by line, in float32 scalars."""
    n = len(x)
    mn, mx = x[0], x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        mn = x[i] if x[i] < mn else mn
        mx = x[i] if x[i] > mx else mx
        sum_w = sum_w + weights[i]
        sum_x = sum_x + weights[i] * x[i]
    if mn > 0:
        mn = F32(0)
    if mx == mn:
        return F32(0), -mn, [0] * n
    iscale = F32(nmax) / (mx - mn)
    scale = F32(1) / iscale
    L = [max(0, min(nmax, nearest(iscale * (x[i] - mn)))) for i in range(n)]
    best_mad = F32(0)
    for i in range(n):
        diff = scale * F32(L[i]) + mn - x[i]
        best_mad = best_mad + weights[i] * (abs(diff) if use_mad else diff * diff)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F32(step) + F32(nmax)) / (mx - mn)
        laux = [max(0, min(nmax, nearest(iscale * (x[i] - mn)))) for i in range(n)]
        sum_l = sum_l2 = sum_xl = F32(0)
        for i in range(n):
            wl = weights[i] * F32(laux[i])
            sum_l, sum_l2, sum_xl = sum_l + wl, sum_l2 + wl * F32(laux[i]), sum_xl + wl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min, this_scale = F32(0), sum_xl / sum_l2
            mad = F32(0)
            for i in range(n):
                diff = this_scale * F32(laux[i]) + this_min - x[i]
                mad = mad + weights[i] * (abs(diff) if use_mad else diff * diff)
            if mad < best_mad:
                L, best_mad, scale, mn = laux, mad, this_scale, this_min
    return scale, -mn, L


def _quantize_row_q4_K_ref_port(x: np.ndarray) -> bytes:
    """quantize_row_q4_K_ref (ggml-quants.c) for one 256-weight super-block, line by line."""
    L, scales, mins = [0] * 256, [], []
    max_scale = max_min = F32(0)
    for j in range(8):
        xs = x[32 * j: 32 * j + 32]
        sum_x2 = F32(0)
        for v in xs:
            sum_x2 = sum_x2 + v * v
        av_x = np.sqrt(sum_x2 / F32(32))
        weights = [av_x + abs(v) for v in xs]
        scale, the_min, L[32 * j: 32 * j + 32] = _make_qkx2_quants_port(xs, weights)
        scales.append(scale)
        mins.append(the_min)
        max_scale = scale if scale > max_scale else max_scale
        max_min = the_min if the_min > max_min else max_min
    inv_scale = F32(63) / max_scale if max_scale > 0 else F32(0)
    inv_min = F32(63) / max_min if max_min > 0 else F32(0)
    packed = [0] * 12
    for j in range(8):
        ls = min(63, _nearest_int(inv_scale * scales[j]) & 0xFF)
        lm = min(63, _nearest_int(inv_min * mins[j]) & 0xFF)
        if j < 4:
            packed[j], packed[j + 4] = ls, lm
        else:
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            packed[j - 4] |= (ls >> 4) << 6
            packed[j] |= (lm >> 4) << 6
    d, dmin = np.float16(max_scale / F32(63)), np.float16(max_min / F32(63))
    for j in range(8):
        if j < 4:
            sc, m = packed[j] & 63, packed[j + 4] & 63
        else:
            sc = (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4)
            m = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4)
        dd = F32(d) * F32(sc)
        if dd == 0:
            continue
        dm = F32(dmin) * F32(m)
        for i in range(32):
            L[32 * j + i] = max(0, min(15, _nearest_int((x[32 * j + i] + dm) / dd)))
    qs = [L[j + l] | (L[j + l + 32] << 4) for j in range(0, 256, 64) for l in range(32)]
    return d.tobytes() + dmin.tobytes() + bytes(packed) + bytes(qs)


def test_q4_k_bytes_equal_a_line_by_line_port_of_llama_cpp():
    rows = [make_weight(kind, rows=1, cols=256, seed=i)[0]
            for i, kind in enumerate(["normal", "outliers", "constant_blocks", "one_sign", "tiny"])]
    rows.append(torch.cat([torch.zeros(32), torch.full((32,), -0.5), torch.full((32,), 0.5), rows[0][96:]]))
    w = torch.stack(rows)  # (6, 256): one super-block per row
    ours, _ = gguf_quantize(w, GGUFQ4_K())
    for i, row in enumerate(w.numpy()):
        assert ours[i].tobytes() == _quantize_row_q4_K_ref_port(row), f"super-block {i} differs"


def test_q4_k_error_is_close_to_a_minmax_4bit_baseline():
    w = make_weight("normal", rows=64, cols=1024, seed=3)
    blocks = w.reshape(-1, 32)
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    baseline = (torch.round((blocks - lo) / step) * step + lo).reshape(w.shape)  # float32 scale, min per 32
    mse_baseline = (baseline - w).square().mean().item()
    mse_q4_k = (GGUFQ4_K().fake_quant(w) - w).square().mean().item()
    # Q4_K stores 6-bit scales (4.5 bpw vs the baseline's 6) but searches for them: it lands near it.
    assert 0 < mse_q4_k < 1.15 * mse_baseline, (mse_q4_k, mse_baseline)


# --- Q3_K and Q2_K ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", BELOW_4, ids=lambda f: f.ggml_type)
def test_below_4_bit_bytes_dequantized_by_gguf_equal_fake_quant(fmt, kind):
    w = make_weight(kind, rows=16, cols=512)
    data, qtype = gguf_quantize(w, fmt)
    assert data.dtype == np.uint8 and data.shape == (16, 2 * fmt.type_size)
    assert_bits_equal(fmt.fake_quant(w), quants.dequantize(data, qtype))


def _make_q3_quants_port(x):
    """make_q3_quants(16, 4, x, L, do_rmse=true) (ggml-quants.c), line by line, in float32 scalars."""
    n, nmax = 16, 4
    mx = amax = F32(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < F32(1e-15):
        return F32(0), [0] * n
    iscale = F32(-nmax) / mx
    sumlx = suml2 = F32(0)
    L = []
    for v in x:
        l = max(-nmax, min(nmax - 1, _nearest_int_ggml(iscale * v)))
        L.append(l)
        w = v * v
        sumlx = sumlx + w * v * F32(l)
        suml2 = suml2 + w * F32(l) * F32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            slx = sumlx - w * x[i] * F32(L[i])
            if slx > 0:
                sl2 = suml2 - w * F32(L[i]) * F32(L[i])
                new_l = max(-nmax, min(nmax - 1, _nearest_int_ggml(x[i] * sl2 / slx)))
                if new_l != L[i]:
                    slx = slx + w * x[i] * F32(new_l)
                    sl2 = sl2 + w * F32(new_l) * F32(new_l)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2 = new_l, slx, sl2
                        n_changed += 1
        if not n_changed:
            break
    return (sumlx / suml2 if suml2 > 0 else F32(0)), [l + nmax for l in L]


def _pack_2bit_port(L) -> list[int]:
    return [L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)
            for j in (0, 128) for l in range(32)]


def _quantize_row_q3_K_ref_port(x: np.ndarray) -> bytes:
    """quantize_row_q3_K_ref (ggml-quants.c) for one 256-weight super-block, line by line."""
    L, scales = [0] * 256, []
    for j in range(16):
        scale, L[16 * j: 16 * j + 16] = _make_q3_quants_port(x[16 * j: 16 * j + 16])
        scales.append(scale)
    max_scale = amax = F32(0)
    for scale in scales:
        if abs(scale) > amax:
            amax, max_scale = abs(scale), scale
    packed = [0] * 12
    if max_scale != 0:
        iscale = F32(-32) / max_scale
        for j in range(16):
            l = ((_nearest_int_ggml(iscale * scales[j]) + 128) & 0xFF) - 128  # stored in an int8_t
            l = max(-32, min(31, l)) + 32
            if j < 8:
                packed[j] = l & 0xF
            else:
                packed[j - 8] |= (l & 0xF) << 4
            packed[j % 4 + 8] |= (l >> 4) << (2 * (j // 4))
        d = np.float16(F32(1) / iscale)
    else:
        d = np.float16(0)
    for j in range(16):
        sc = packed[j] & 0xF if j < 8 else packed[j - 8] >> 4
        sc = (sc | (((packed[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
        dd = F32(d) * F32(sc)
        if dd == 0:
            continue
        for i in range(16):
            L[16 * j + i] = max(-4, min(3, _nearest_int_ggml(x[16 * j + i] / dd))) + 4
    hmask, m, hm = [0] * 32, 0, 1
    for j in range(256):
        if L[j] > 3:
            hmask[m] |= hm
            L[j] -= 4
        m += 1
        if m == 32:
            m, hm = 0, hm << 1
    return bytes(hmask) + bytes(_pack_2bit_port(L)) + bytes(packed) + d.tobytes()


def _quantize_row_q2_K_ref_port(x: np.ndarray) -> bytes:
    """quantize_row_q2_K_ref (ggml-quants.c) for one 256-weight super-block, line by line."""
    L, scales, mins = [0] * 256, [], []
    max_scale = max_min = F32(0)
    for j in range(16):
        xs = x[16 * j: 16 * j + 16]
        scale, the_min, L[16 * j: 16 * j + 16] = _make_qkx2_quants_port(
            xs, [abs(v) for v in xs], nmax=3, rmin=F32(-0.5), rdelta=F32(0.1), nstep=15, use_mad=True,
            nearest=_nearest_int_ggml)
        scales.append(scale)
        mins.append(the_min)
        max_scale = scale if scale > max_scale else max_scale
        max_min = the_min if the_min > max_min else max_min
    packed = [0] * 16
    d = dmin = np.float16(0)
    if max_scale > 0:
        iscale = F32(15) / max_scale
        packed = [_nearest_int_ggml(iscale * scales[j]) & 0xFF for j in range(16)]
        d = np.float16(max_scale / F32(15))
    if max_min > 0:
        iscale = F32(15) / max_min
        packed = [(packed[j] | (_nearest_int_ggml(iscale * mins[j]) << 4)) & 0xFF for j in range(16)]
        dmin = np.float16(max_min / F32(15))
    for j in range(16):
        dd = F32(d) * F32(packed[j] & 0xF)
        if dd == 0:
            continue
        dm = F32(dmin) * F32(packed[j] >> 4)
        for i in range(16):
            L[16 * j + i] = max(0, min(3, _nearest_int_ggml((x[16 * j + i] + dm) / dd)))
    return bytes(packed) + bytes(_pack_2bit_port(L)) + d.tobytes() + dmin.tobytes()


def _special_rows() -> torch.Tensor:
    """One super-block per row: every kind, and sub-blocks that are zero, constant, huge or tiny."""
    rows = [make_weight(kind, rows=1, cols=256, seed=i)[0] for i, kind in enumerate(KINDS)]
    rows.append(torch.cat([torch.zeros(16), torch.full((16,), -0.5), torch.full((16,), 0.5), rows[0][48:]]))
    huge = rows[1] * 1e4
    huge[:16], huge[16] = -3e4, 1e-3  # (x + dm) / d far beyond 2^22 for nearest_int
    rows.append(huge)
    return torch.stack(rows)  # (11, 256)


@pytest.mark.parametrize("fmt, port", [(GGUFQ3_K(), _quantize_row_q3_K_ref_port),
                                       (GGUFQ2_K(), _quantize_row_q2_K_ref_port)], ids=["Q3_K", "Q2_K"])
def test_below_4_bit_bytes_equal_a_line_by_line_port_of_llama_cpp(fmt, port):
    w = _special_rows()
    ours, _ = gguf_quantize(w, fmt)
    with np.errstate(all="ignore"):  # the port divides as C does, inf and all
        for i, row in enumerate(w.numpy()):
            assert ours[i].tobytes() == port(row), f"super-block {i} differs"


def _ggml_base():
    """llama.cpp's own quantizers: libggml-base from llama-cpp-python (its reference C functions, no FMA)."""
    import ctypes
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llama_cpp")
    libs = sorted(Path(spec.origin).parent.glob("lib/libggml-base.so*")) if spec else []
    if not libs:
        pytest.skip("needs llama-cpp-python's libggml-base: pip install 'edgestill[llamacpp]'")
    return ctypes, ctypes.CDLL(str(libs[0]))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fmt", K_QUANTS, ids=lambda f: f.ggml_type)
def test_k_quant_bytes_equal_llama_cpps_own_quantizer(fmt, seed):
    """quantize_row_q{4,3,2}_K_ref, the functions llama-quantize calls without an importance matrix, byte for byte."""
    ctypes, lib = _ggml_base()
    fn = getattr(lib, f"quantize_row_{fmt.ggml_type[:2].lower()}_K_ref")
    for kind in KINDS:
        w = make_weight(kind, rows=32, cols=512, seed=seed)
        x = np.ascontiguousarray(w.numpy(), dtype=np.float32)
        theirs = np.zeros((32, 2 * fmt.type_size), dtype=np.uint8)
        fn(x.ctypes.data_as(ctypes.c_void_p), theirs.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
        ours, _ = gguf_quantize(w, fmt)
        differ = (ours.reshape(-1, fmt.type_size) != theirs.reshape(-1, fmt.type_size)).any(-1).sum()
        assert differ == 0, f"{kind}: {differ} of {x.size // 256} super-blocks differ"
    x = np.ascontiguousarray(_special_rows().numpy())
    theirs = np.zeros((x.shape[0], fmt.type_size), dtype=np.uint8)
    fn(x.ctypes.data_as(ctypes.c_void_p), theirs.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    np.testing.assert_array_equal(gguf_quantize(torch.from_numpy(x), fmt)[0], theirs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", BELOW_4, ids=lambda f: f.ggml_type)
def test_values_already_on_the_grid_are_kept(fmt, kind):
    """A converted (QAT, RTN) or GPTQ weight holds Q3_K/Q2_K values already: fake_quant keeps them and the export
    stores them exactly. llama.cpp's own quantizer is not idempotent on them (its search refits such blocks)."""
    w = make_weight(kind, rows=16, cols=512, seed=7)
    v = fmt.fake_quant(w)
    assert_bits_equal(fmt.fake_quant(v), v)
    data, qtype = gguf_quantize(v, fmt)
    assert_bits_equal(v, quants.dequantize(data, qtype))
    deq, _ = fmt.block_quantizer(w[:, :256])  # GPTQ's values: the entry scales, other codes
    g = deq(w[:, :256] + 0.3 * w.std() * torch.randn(16, 256, generator=torch.Generator().manual_seed(8)), slice(None))
    assert_bits_equal(fmt.fake_quant(g), g)


def test_every_qat_format_keeps_its_own_values():
    """An export re-encodes the converted (QAT) model, so a format QAT trains must be idempotent (up to the sign
    of a zero for the 32-weight formats; bit for bit for Q3_K and Q2_K, see the test above)."""
    from edgestill.quant.formats import REGISTRY

    for spec in REGISTRY:
        if spec.qat:
            for kind in ("normal", "outliers", "zero_blocks"):
                v = spec.cls().fake_quant(make_weight(kind, rows=8, cols=512, seed=5))
                assert torch.equal(spec.cls().fake_quant(v), v), (spec.name, kind)


def test_llama_cpps_quantizer_alone_would_move_converted_weights():
    from edgestill.quant import q2_k, q3_k

    w = make_weight("outliers", rows=16, cols=1024)
    v3, v2 = GGUFQ3_K().fake_quant(w).reshape(-1, 256), GGUFQ2_K().fake_quant(w).reshape(-1, 256)
    again3 = q3_k.dequantize_q3_k(*q3_k.quantize_row_q3_k_ref(v3))
    again2 = q2_k.dequantize_q2_k(*q2_k.quantize_row_q2_k_ref(v2))
    assert (again3 != v3).any(-1).float().mean() > 0.2 and (again2 != v2).any(-1).float().mean() > 0.2


def test_fewer_bits_more_error():
    w = make_weight("normal", rows=64, cols=1024, seed=3)
    blocks = w.reshape(-1, 16)
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    step = (hi - lo) / 3
    minmax_2bit = (torch.round((blocks - lo) / step) * step + lo).reshape(w.shape)  # float32 scale, min per 16
    mse = {f.ggml_type: (f.fake_quant(w) - w).square().mean().item() for f in K_QUANTS}
    assert 0 < mse["Q4_K"] < mse["Q3_K"] < mse["Q2_K"], mse
    # Q2_K stores 4-bit scales and mins (2.625 bpw vs the baseline's 6) but searches for them: it lands near it.
    assert mse["Q2_K"] < 1.15 * (minmax_2bit - w).square().mean().item(), mse


# --- fallbacks ---------------------------------------------------------------------------------------------

def test_fallback_rules():
    assert resolve_format(GGUFQ4_K(), 512) == (GGUFQ4_K(), None)
    fmt, why = resolve_format(GGUFQ4_K(), 64)
    assert fmt == GGUFQ5_0() and "llama_tensor_get_type" in why and "64" in why
    assert resolve_format(GGUFQ4_K(), 48)[0] == GGUFF16()
    for fmt in BELOW_4:  # llama_tensor_get_type: Q2_K and Q3_K fall back to Q4_0, then F16
        assert resolve_format(fmt, 768) == (fmt, None)
        stored, why = resolve_format(fmt, 64)
        assert stored == GGUFQ4_0() and "llama_tensor_get_type" in why and "64" in why
        assert resolve_format(fmt, 48)[0] == GGUFF16()
    fmt, why = resolve_format(GGUFQ4_0(), 48)
    assert fmt == GGUFF16() and "48" in why and "32" in why
    assert resolve_format(Int4Block(), 48) == (Int4Block(), None)
    assert resolve_format(Int8PerChannel(), 48) == (Int8PerChannel(), None)


@pytest.mark.parametrize("fmt", [GGUFQ4_0(), GGUFQ8_0(), *K_QUANTS], ids=lambda f: f.ggml_type)
def test_odd_rows_are_refused_not_corrupted(fmt):
    with pytest.raises(EdgestillError, match="resolve_format"):
        fmt.fake_quant(torch.randn(4, 48))
    with pytest.raises(EdgestillError):
        gguf_quantize(torch.randn(4, 48), fmt)


# --- ONNX Runtime ----------------------------------------------------------------------------------------

def test_int8_per_channel_equals_onnxruntime_quantizer_math():
    w = make_weight("outliers", rows=16, cols=96)
    w[3] = 0  # ORT uses scale 1.0 for an all-zero channel
    ref = []
    for row in w.numpy():  # onnxruntime.quantization: compute_scale_zp (float64) then quantize_nparray
        absmax = np.abs(row).max()
        scale = np.float32(np.float64(2 * absmax) / 254.0) if absmax > 0 else np.float32(1.0)
        q = np.clip(np.round(row.astype(np.float32) / scale), -127, 127).astype(np.int8)
        ref.append(q.astype(np.float32) * scale)
    assert_bits_equal(Int8PerChannel().fake_quant(w), np.stack(ref))
    q, scale = int8_per_channel_codes(w)
    assert q.dtype == torch.int8 and scale[3] == 1.0 and q.abs().max() == 127


def _mlas_block_reference(block: np.ndarray, symmetric: bool) -> np.ndarray:
    """MLAS MlasQuantizeBlockwise on one block's valid weights, then the op's (q - zp) * scale."""
    lo, hi = block.min(), block.max()
    if symmetric:
        signed_max = hi if abs(hi) > abs(lo) else lo
        scale, zp = signed_max / F32(-8), 8
    else:
        lo, hi = min(lo, F32(0)), max(hi, F32(0))
        scale = (hi - lo) / F32(15)
        zp_f = F32(0) - lo / scale if scale != 0 else lo
        zp = 0 if zp_f < 0 else 15 if zp_f > 15 else int(quants.np_roundf(np.array([zp_f]))[0])
    inv = F32(1) / scale if scale != 0 else F32(0)
    q = np.clip(quants.np_roundf(block * inv + F32(zp)), 0, 15).astype(np.uint8)  # integer codes: no -0.0
    return (q.astype(np.float32) - F32(zp)) * scale


def _unpack_matmul_nbits(packed, k: int, block_size: int) -> np.ndarray:
    """Dequantize from the documented MatMulNBits inputs (low nibble first; zero point 8 if absent)."""
    B, scales, zero_points = packed["B"], packed["scales"], packed["zero_points"]
    n, k_blocks, _ = B.shape
    q = np.stack([B & 0xF, B >> 4], axis=-1).reshape(n, k_blocks, block_size).astype(np.float32)
    if zero_points is None:
        zp = np.full((n, k_blocks), 8, dtype=np.float32)
    else:
        zp = np.stack([zero_points & 0xF, zero_points >> 4], axis=-1).reshape(n, -1)[:, :k_blocks]
        zp = zp.astype(np.float32)
    w = (q - zp[..., None]) * scales[..., None]
    return w.reshape(n, -1)[:, :k]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [96, 80])  # 80: a partial last block and an odd number of zero points
def test_int4_block_matches_mlas_and_the_documented_layout(symmetric, k):
    fmt = Int4Block(block_size=32, symmetric=symmetric)
    w = make_weight("outliers", rows=8, cols=k)
    w[0, :32] = -w[0, :32].abs()
    w[1, :32] = 0
    w[2, :32], w[2, 5], w[2, 9] = 0.1, 0.5, -0.5  # |max| == |min|: MLAS takes the min
    ref = np.stack([np.concatenate([_mlas_block_reference(row[i:i + 32], symmetric) for i in range(0, k, 32)])
                    for row in w.numpy()])
    ours = fmt.fake_quant(w)
    assert_bits_equal(ours, ref)
    packed = pack_matmul_nbits(w, fmt)
    k_blocks = -(-k // 32)
    assert packed["B"].shape == (8, k_blocks, 16) and packed["scales"].dtype == np.float32
    assert (packed["zero_points"] is None) == symmetric
    assert_bits_equal(ours, _unpack_matmul_nbits(packed, k, 32))
    nbytes = sum(a.nbytes for a in packed.values() if a is not None)
    assert nbytes == fmt.weight_bytes((8, k))


def test_int4_block_size_is_validated():
    with pytest.raises(EdgestillError, match="power of 2"):
        Int4Block(block_size=24)
    assert Int4Block(block_size=32).bits_per_weight == 5.0
    assert Int4Block(block_size=32, symmetric=False).bits_per_weight == 5.125


# --- the registry: one list of formats, everything else derived from it -------------------------------------

def test_registry_entries_are_consistent():
    from gguf import LlamaFileType

    from edgestill.quant.formats import FORMATS, REGISTRY

    names = [spec.name for spec in REGISTRY]
    assert len(set(names)) == len(names) and tuple(spec.cls for spec in REGISTRY) == FORMATS
    for spec in REGISTRY:
        fmt = spec.cls()
        assert callable(fmt.fake_quant) and spec.gptq == callable(getattr(fmt, "block_quantizer", None))
        assert spec.quantized == (fmt.bits_per_weight < 16)
        if spec.gguf:  # the short name is the GGUF export's tensor type and the ggml type in lower case
            assert spec.name == spec.ggml_type.lower() and spec.ggml_type in GGMLQuantizationType.__members__
            assert spec.file_type in LlamaFileType.__members__, spec
            assert spec.vec_dot_type in ("q8_0", "q8_1", "q8_k", "f16"), spec
            if spec.quantized:
                assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[GGMLQuantizationType[spec.ggml_type]]
        else:
            assert spec.file_type is spec.vec_dot_type is spec.fallback is None and spec.scale_fields == 0
            assert not (spec.qat or spec.plan or spec.hostbench)  # what llama.cpp does not run
        if spec.fallback is not None:  # a GGUF format with a smaller block
            assert format_spec(spec.fallback).gguf and format_by_name(spec.fallback).block_size < fmt.block_size
        if spec.plan_default:  # students are trained in the planner's default formats
            assert spec.qat and spec.plan
        if spec.qat or spec.plan or spec.hostbench:
            assert spec.gguf, spec


@pytest.mark.parametrize("name", ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q4_k", "q3_k", "q2_k"])
def test_scale_fields_of_every_block(name):
    """scale_fields fp16 fields (scale, then min) at scale_offset in each block: zeroed, all weights dequantize to 0."""
    spec = format_spec(name)
    qtype = GGMLQuantizationType[spec.ggml_type]
    data, _ = gguf_quantize(make_weight("normal", rows=4, cols=512), spec.cls())
    blocks = np.array(data).reshape(4, -1, spec.cls.type_size)  # (rows, blocks, type_size)
    start = spec.scale_offset
    assert start + 2 * spec.scale_fields <= spec.cls.type_size and (start == 0) == (name not in ("q3_k", "q2_k"))
    zeroed = blocks.copy()
    zeroed[..., start: start + 2 * spec.scale_fields] = 0
    assert not np.any(quants.dequantize(zeroed.reshape(4, -1), qtype))
    fewer = blocks.copy()
    fewer[..., start: start + 2 * (spec.scale_fields - 1)] = 0
    assert np.any(quants.dequantize(fewer.reshape(4, -1), qtype))


def test_registry_lookups():
    from edgestill.quant.formats import as_format, format_name, format_names

    assert format_spec("Q4_0") is format_spec("q4_0") is format_spec(GGUFQ4_0()) is format_spec(GGUFQ4_0)
    assert format_name(Int4Block(block_size=64)) == "int4" and format_by_name("Q4_K") == GGUFQ4_K()
    assert as_format("q5_1") == GGUFQ5_1() and as_format({"format": "Int4Block", "block_size": 64}) == Int4Block(64)
    assert as_format(GGUFQ8_0()) == GGUFQ8_0() and as_format("GGUFQ8_0") == GGUFQ8_0()
    assert format_names(plan_default=True) == ("q8_0", "q5_0", "q4_0")  # sweeps' cache keys hold this order
    assert format_names(qat=True) == ("f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q3_k", "q2_k")
    assert format_names(onnx=True, gguf=False) == ("int8", "int4")
    assert format_by_name("Q3_K") == GGUFQ3_K() and as_format("q2_k") == GGUFQ2_K()
    assert format_name(GGUFQ2_K()) == "q2_k"
    with pytest.raises(EdgestillError, match="unknown quantization format 'q6_k'; choose one of f16, q8_0"):
        format_spec("q6_k")
    with pytest.raises(TypeError, match="unknown capabilities"):
        format_names(trainable=True)


def test_every_format_list_is_derived_from_the_registry():
    """CLI choices, config validation, export types, the planner and the host benchmark all read the registry."""
    from edgestill.cli import build_parser
    from edgestill.config import ONNX_CLASSIFIER_TYPES, load_config
    from edgestill.export import gguf as gguf_export
    from edgestill.export import onnx as onnx_export
    from edgestill.export.onnx_classifier import CLASSIFIER_TYPES
    from edgestill.plan.allocate import DEFAULT_FORMATS
    from edgestill.plan.cost import GGUF_FORMAT_NAMES
    from edgestill.plan.hostbench import CALIBRATION_FORMATS
    from edgestill.quant.formats import REGISTRY, format_names

    assert gguf_export.tensor_types() == ("f32", *(s.name for s in REGISTRY if s.gguf))
    assert onnx_export.onnx_types() == ("f32", *(s.name for s in REGISTRY if s.onnx))
    assert ONNX_CLASSIFIER_TYPES == CLASSIFIER_TYPES == ("f32", *(s.name for s in REGISTRY if s.onnx and not s.gguf))
    assert GGUF_FORMAT_NAMES == tuple(s.name for s in REGISTRY if s.plan)
    assert DEFAULT_FORMATS == tuple(s.name for s in REGISTRY if s.plan_default)
    assert CALIBRATION_FORMATS == tuple(s.name for s in REGISTRY if s.hostbench)
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    choices = {cmd: next(a.choices for a in sub[cmd]._actions if a.dest == "tensor_type") for cmd in ("quantize", "export")}
    assert list(choices["export"]) == ["f32", *(s.name for s in REGISTRY)]
    assert list(choices["quantize"]) == [s.name for s in REGISTRY if s.qat and s.quantized]
    assert next(a.default for a in sub["plan"]._actions if a.dest == "formats") == ",".join(DEFAULT_FORMATS)
    for spec in REGISTRY:  # a recipe takes exactly the formats the registry lets QAT train
        if spec.qat:
            assert load_config(overrides=[f"quant.format={spec.name.upper()}"]).quant.format == spec.name.upper()
        elif spec.gguf:
            with pytest.raises(EdgestillError, match=f"quant format {spec.name} is too slow"):
                load_config(overrides=[f"quant.format={spec.name}"])
        else:
            with pytest.raises(EdgestillError, match="is not a GGUF training format; use f16, q8_0"):
                load_config(overrides=[f"quant.format={spec.name}"])
    assert format_names(gguf=True) == GGUF_FORMAT_NAMES


def test_below_4_bit_formats_leave_every_default_alone():
    """Q3_K and Q2_K train, export and GPTQ by name, and the cost model prices them when asked; the planner's default
    menu, the host benchmark's formats, the sweep's and every recipe's default are what they were."""
    from edgestill.cli import build_parser
    from edgestill.config import load_config
    from edgestill.jobs.sweep import SweepSettings
    from edgestill.plan import allocate, sensitivity
    from edgestill.plan.cost import GGUF_FORMAT_NAMES
    from edgestill.plan.hostbench import CALIBRATION_FORMATS
    from edgestill.quant.formats import format_names

    menu = ("q8_0", "q5_0", "q4_0")
    assert allocate.DEFAULT_FORMATS == sensitivity.DEFAULT_FORMATS == SweepSettings().formats == menu
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert next(a.default for a in sub["plan"]._actions if a.dest == "formats") == ",".join(menu)
    assert CALIBRATION_FORMATS == ("f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q4_k")
    assert load_config().quant.format is None and load_config().quant.plan == {}
    for name in ("q3_k", "q2_k"):
        spec = format_spec(name)
        assert spec.qat and spec.gptq and spec.plan and not (spec.plan_default or spec.hostbench or spec.onnx)
        assert name in GGUF_FORMAT_NAMES and name in format_names(qat=True, quantized=True)
        assert load_config(overrides=[f"quant.format={name}"]).quant.format == name
        assert spec.vec_dot_type == "q8_k" and spec.fallback == "q4_0"
    assert format_spec("q3_k").file_type == "MOSTLY_Q3_K_S" and format_spec("q2_k").file_type == "MOSTLY_Q2_K_S"


def test_onnx_flag_means_an_exact_onnx_op():
    from edgestill.export.onnx import _pack
    from edgestill.quant.formats import REGISTRY

    w = make_weight("normal", rows=8, cols=64).numpy()
    for spec in REGISTRY:
        if spec.onnx:
            packed = _pack(spec.cls().fake_quant(torch.from_numpy(w)).numpy(), spec.cls())
            np.testing.assert_array_equal(packed.dequantize(), spec.cls().fake_quant(torch.from_numpy(w)).numpy())
        elif spec.quantized:
            with pytest.raises(EdgestillError, match="no exact ONNX operator"):
                _pack(w, spec.cls())
