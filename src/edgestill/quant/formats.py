"""Weight formats that are bit for bit what the runtimes store.

Each format is a small frozen dataclass config with `block_size`, `bits_per_weight` (scales
included), `weight_bytes(shape)`, `supports(in_features)` and `fake_quant(w) -> w_hat`: quantize
then dequantize a (out_features, in_features) weight, returning in float32 exactly the values
the runtime multiplies with. Blocks run along the input dim of each row, as in GGUF files.

GGUF (llama.cpp):
    GGUFQ8_0, GGUFQ4_0, GGUFQ4_1, GGUFQ5_0, GGUFQ5_1 reproduce the reference quantizer of the
    `gguf` package (gguf/quants.py, a port of ggml-quants.c's quantize_row_*_ref) in torch,
    operation for operation: the scale is computed and used in float32 but stored (and
    dequantized) as fp16; Q4_0/Q5_0 divide by the *signed* largest-magnitude value (first one on
    ties) over -8/-16, so that value lands on code 0; the 4/5-bit codes truncate `x/d + 8.5`
    (or `(x-min)/d + 0.5`); Q8_0 rounds half away from zero. The K-quants GGUFQ4_K, GGUFQ3_K and
    GGUFQ2_K (256-weight super-blocks) reproduce llama.cpp's own quantize_row_q*_K_ref, which the
    gguf package does not have: `q4_k.py`, `q3_k.py`, `q2_k.py`. llama.cpp's K-quant search is not
    idempotent: it refits some blocks of weights that already hold its values. Q3_K and Q2_K keep
    such weights (their fake_quant is idempotent, as the 32-weight formats' is up to the sign of a
    zero), so a converted (QAT) model exports as it is; Q4_K does not.
    GGUFF16 is the fallback: a plain fp16 round trip.
ONNX Runtime:
    Int8PerChannel: int8 symmetric per output channel, as onnxruntime.quantization writes
        weights (DequantizeLinear, axis 0): scale = absmax/127 (1.0 for an all-zero row),
        q = round_half_even(w / scale) clipped to [-127, 127], w_hat = q * scale.
    Int4Block: com.microsoft.MatMulNBits' 4-bit blocks along K, dequantized as the contrib op
        documents, (q - zero_point) * scale, with ORT's own block quantizer (MLAS
        MlasQuantizeBlockwise): symmetric (default) uses scale = signed max / -8 and the
        implicit zero point 8; asymmetric uses scale = (max(max,0) - min(min,0)) / 15 and an
        explicit uint4 zero point; q = clamp(roundf(w / scale + zp), 0, 15) with roundf half
        away from zero. A last partial block is allowed (k_blocks = ceil(K / block_size)).

A row that a GGUF block does not divide is never quantized silently: `fake_quant` raises, and
`resolve_format` picks the documented fallback (see there).

Each format also has `block_quantizer(block)`: its coding rule with the scales fixed from one block's
current weights, which is what GPTQ (gptq.py) quantizes a column with.

The registry (`REGISTRY`, at the end of this file) is the one list of formats: one FormatSpec per
format with its short name (`q4_0`: recipes, the CLI, plans), its class, and what each part of
edgestill may do with it (train it with QAT every step, plan it, time it in the host benchmark,
export it to ONNX with an exact op, run GPTQ with it; its GGUF file type, llama.cpp activation type,
block scale fields and row fallback). Config validation, the CLI's choices, the GGUF and ONNX export
types, GPTQ, the planner and the host benchmark all read it, so a new format is its class and its
registry entry here, plus its test.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import numpy as np
import torch

from edgestill.errors import EdgestillError
from edgestill.quant import q2_k, q3_k, q4_k

# --- float32 helpers that match C and numpy exactly ------------------------------------------------

def f32_div(a: torch.Tensor, b: float) -> torch.Tensor:
    """a / b rounded once. (`t / 3.0` with a Python scalar multiplies by a rounded reciprocal on CUDA.)"""
    return a / torch.tensor(b, dtype=torch.float32, device=a.device)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d is 0: the `id = d ? 1.0f/d : 0.0f` of every ggml quantizer."""
    return torch.where(d == 0, 0.0, torch.ones_like(d) / d)


def round_to_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 (nearest even, as numpy and ggml do) and back to float32."""
    return x.to(torch.float16).to(torch.float32)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf, written as gguf's np_roundf: exact, unlike trunc(x + 0.5) near 0.49999997."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _check_rows(w: torch.Tensor, block_size: int, name: str) -> None:
    if w.shape[-1] % block_size:
        raise EdgestillError(
            f"{name} needs rows that are a multiple of {block_size} weights; this weight has rows of "
            f"{w.shape[-1]}. Use resolve_format(fmt, in_features) to get the documented fallback"
        )


def _blocks(w: torch.Tensor, block_size: int, name: str) -> torch.Tensor:
    _check_rows(w, block_size, name)
    return w.detach().to(torch.float32).reshape(-1, block_size)  # (n_blocks, block_size)


def _signed_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each block, sign kept (the first one on ties, as argmax)."""
    return blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))  # (n_blocks, 1)


# --- GGUF legacy block formats -----------------------------------------------------------------------

def _q8_0(w: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(w, 32, "Q8_0")  # (n, 32)
    d = f32_div(blocks.abs().amax(-1, keepdim=True), 127)  # (n, 1)
    q = _round_half_away(blocks * _inverse(d)).to(torch.int8)
    return (q.float() * round_to_fp16(d)).reshape(w.shape)


def _q4_0(w: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(w, 32, "Q4_0")
    d = f32_div(_signed_absmax(blocks), -8)  # the signed max maps to code 0, i.e. to -8 * d
    q = torch.trunc(blocks * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return (round_to_fp16(d) * (q.to(torch.int8) - 8).float()).reshape(w.shape)


def _q5_0(w: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(w, 32, "Q5_0")
    d = f32_div(_signed_absmax(blocks), -16)
    q = torch.trunc(blocks * _inverse(d) + 16.5).clamp(0, 31).to(torch.uint8)
    return (round_to_fp16(d) * (q.to(torch.int8) - 16).float()).reshape(w.shape)


def _affine(w: torch.Tensor, levels: int, name: str) -> torch.Tensor:
    """Q4_1 (levels 15) and Q5_1 (levels 31): d = (max - min) / levels, w_hat = d * q + min."""
    blocks = _blocks(w, 32, name)
    bmin, bmax = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)  # (n, 1)
    d = f32_div(bmax - bmin, levels)
    q = torch.trunc((blocks - bmin) * _inverse(d) + 0.5).clamp(0, levels).to(torch.uint8)
    return (round_to_fp16(d) * q.float() + round_to_fp16(bmin)).reshape(w.shape)


# --- static-scale coders, one format block at a time (GPTQ, gptq.py) -----------------------------------
#
# Each takes a block's current weights (rows, g) in their original column order and returns dequant(x, cols):
# the format's own coding rule with this block's scales, for values x (rows, n) at the block positions `cols`
# (a slice), plus the positions (rows, A) of the weights that set the scales (None when no single weight
# does). The arithmetic mirrors the fake_quant functions above operation for operation.

def _q8_0_block(block: torch.Tensor):
    d = f32_div(block.abs().amax(-1, keepdim=True), 127)  # (rows, 1)
    inv, d16 = _inverse(d), round_to_fp16(d)

    def dequant(x, cols):
        q = _round_half_away(x * inv).clamp(-127, 127).to(torch.int8)  # an updated weight may overshoot
        return q.float() * d16

    return dequant, block.abs().argmax(-1, keepdim=True)


def _symmetric_block(block: torch.Tensor, half: int):
    """Q4_0 (half 8) and Q5_0 (half 16): d = signed absmax / -half, codes trunc(x/d + half + 0.5)."""
    d = f32_div(_signed_absmax(block), -half)  # (rows, 1)
    inv, d16 = _inverse(d), round_to_fp16(d)

    def dequant(x, cols):
        q = torch.trunc(x * inv + (half + 0.5)).clamp(0, 2 * half - 1).to(torch.uint8)
        return d16 * (q.to(torch.int8) - half).float()

    return dequant, block.abs().argmax(-1, keepdim=True)


def _affine_block(block: torch.Tensor, levels: int):
    """Q4_1 (levels 15) and Q5_1 (levels 31): d = (max - min) / levels, w = d * q + min."""
    bmin, bmax = block.amin(-1, keepdim=True), block.amax(-1, keepdim=True)  # (rows, 1)
    d = f32_div(bmax - bmin, levels)
    inv, d16, min16 = _inverse(d), round_to_fp16(d), round_to_fp16(bmin)

    def dequant(x, cols):
        q = torch.trunc((x - bmin) * inv + 0.5).clamp(0, levels).to(torch.uint8)
        return d16 * q.float() + min16

    return dequant, torch.cat([block.argmin(-1, keepdim=True), block.argmax(-1, keepdim=True)], -1)


class _GGUFBlocks:
    """What every GGUF block format shares: rows must divide into blocks; bytes from gguf's size table."""

    block_size: ClassVar[int]

    def supports(self, in_features: int) -> bool:
        return in_features % self.block_size == 0

    def weight_bytes(self, shape: tuple[int, int]) -> int:
        return _gguf_bytes(self, shape)


@dataclass(frozen=True)
class GGUFF16:
    """GGUF F16: the fallback for rows no quantized block divides (16 bits per weight)."""

    ggml_type: ClassVar[str] = "F16"
    block_size: ClassVar[int] = 1
    bits_per_weight: ClassVar[float] = 16.0

    def supports(self, in_features: int) -> bool:
        return True

    def weight_bytes(self, shape: tuple[int, int]) -> int:
        return 2 * shape[0] * shape[1]

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return round_to_fp16(w.detach())

    def block_quantizer(self, block: torch.Tensor):
        return (lambda x, cols: round_to_fp16(x)), None


def _gguf_bytes(fmt, shape: tuple[int, int]) -> int:
    return shape[0] * (shape[1] // fmt.block_size) * fmt.type_size


@dataclass(frozen=True)
class GGUFQ8_0(_GGUFBlocks):
    """GGUF Q8_0: 32 int8 codes + an fp16 scale per block (8.5 bits per weight); round half away."""

    ggml_type: ClassVar[str] = "Q8_0"
    block_size: ClassVar[int] = 32
    type_size: ClassVar[int] = 34
    bits_per_weight: ClassVar[float] = 8.5

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return _q8_0(w)

    def block_quantizer(self, block: torch.Tensor):
        return _q8_0_block(block)


@dataclass(frozen=True)
class GGUFQ4_0(_GGUFBlocks):
    """GGUF Q4_0: 32 4-bit codes + an fp16 scale per block (4.5 bits per weight), symmetric."""

    ggml_type: ClassVar[str] = "Q4_0"
    block_size: ClassVar[int] = 32
    type_size: ClassVar[int] = 18
    bits_per_weight: ClassVar[float] = 4.5

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return _q4_0(w)

    def block_quantizer(self, block: torch.Tensor):
        return _symmetric_block(block, 8)


@dataclass(frozen=True)
class GGUFQ4_1(_GGUFBlocks):
    """GGUF Q4_1: 32 4-bit codes + fp16 scale and min per block (5.0 bits per weight)."""

    ggml_type: ClassVar[str] = "Q4_1"
    block_size: ClassVar[int] = 32
    type_size: ClassVar[int] = 20
    bits_per_weight: ClassVar[float] = 5.0

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return _affine(w, 15, "Q4_1")

    def block_quantizer(self, block: torch.Tensor):
        return _affine_block(block, 15)


@dataclass(frozen=True)
class GGUFQ5_0(_GGUFBlocks):
    """GGUF Q5_0: 32 5-bit codes + an fp16 scale per block (5.5 bits per weight), symmetric."""

    ggml_type: ClassVar[str] = "Q5_0"
    block_size: ClassVar[int] = 32
    type_size: ClassVar[int] = 22
    bits_per_weight: ClassVar[float] = 5.5

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return _q5_0(w)

    def block_quantizer(self, block: torch.Tensor):
        return _symmetric_block(block, 16)


@dataclass(frozen=True)
class GGUFQ5_1(_GGUFBlocks):
    """GGUF Q5_1: 32 5-bit codes + fp16 scale and min per block (6.0 bits per weight)."""

    ggml_type: ClassVar[str] = "Q5_1"
    block_size: ClassVar[int] = 32
    type_size: ClassVar[int] = 24
    bits_per_weight: ClassVar[float] = 6.0

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return _affine(w, 31, "Q5_1")

    def block_quantizer(self, block: torch.Tensor):
        return _affine_block(block, 31)


def _affine_k_dequant(d, dmin, sc, m, sub: int, qmax: int):
    """GPTQ's coding rule for an affine K-quant super-block (Q4_K, Q2_K): codes 0..qmax, w = d*sc*q - dmin*m."""
    d_col = (d.float()[:, None] * sc.float()).repeat_interleave(sub, dim=1)  # (rows, 256)
    dm_col = (dmin.float()[:, None] * m.float()).repeat_interleave(sub, dim=1)

    def dequant(x, cols):
        ds, dm = d_col[:, cols], dm_col[:, cols]
        q = q4_k.nearest_int((x + dm) / ds).clamp(0, qmax)
        q = torch.where(ds != 0, q, 0.0)  # a zero sub-block scale: every code dequantizes to -dm
        return ds * q - dm

    return dequant


@dataclass(frozen=True)
class GGUFQ4_K(_GGUFBlocks):
    """GGUF Q4_K: 256-weight super-blocks of 8 sub-blocks, 6-bit scales/mins (4.5 bits per weight).

    Quantized with llama.cpp's quantize_row_q4_K_ref algorithm (see edgestill.quant.q4_k).
    """

    ggml_type: ClassVar[str] = "Q4_K"
    block_size: ClassVar[int] = q4_k.QK_K
    type_size: ClassVar[int] = q4_k.TYPE_SIZE
    bits_per_weight: ClassVar[float] = 4.5

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        _check_rows(w, self.block_size, "Q4_K")
        return q4_k.fake_quant_q4_k(w.reshape(-1, w.shape[-1])).reshape(w.shape)

    def block_quantizer(self, block: torch.Tensor):
        """One 256-column super-block: llama.cpp's scale/min search at entry, then its final coding rule.

        No weight can be pinned: the scales come from a least-squares search, not from the extremes.
        """
        d, dmin, sc, m, _ = q4_k.q4_k_codes(block)
        return _affine_k_dequant(d, dmin, sc, m, q4_k.SUB, 15), None


@dataclass(frozen=True)
class GGUFQ3_K(_GGUFBlocks):
    """GGUF Q3_K: 256-weight super-blocks of 16 sub-blocks, signed 3-bit codes, 6-bit scales (3.4375 bits per weight).

    Quantized with llama.cpp's quantize_row_q3_K_ref algorithm; weights that already hold Q3_K values are kept
    (see edgestill.quant.q3_k).
    """

    ggml_type: ClassVar[str] = "Q3_K"
    block_size: ClassVar[int] = q3_k.QK_K
    type_size: ClassVar[int] = q3_k.TYPE_SIZE
    bits_per_weight: ClassVar[float] = 3.4375

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        _check_rows(w, self.block_size, "Q3_K")
        return q3_k.fake_quant_q3_k(w.reshape(-1, w.shape[-1])).reshape(w.shape)

    def block_quantizer(self, block: torch.Tensor):
        """One 256-column super-block: llama.cpp's scale search at entry, then its final coding rule.

        No weight can be pinned: the scales come from a least-squares refinement, not from the extremes. A
        sub-block whose quantized scale is 0 dequantizes to zeros, signed by its entry codes as fake_quant's are.
        """
        d, sc, codes = q3_k.q3_k_codes(block)
        d_col = (d.float()[:, None] * (sc - 32).float()).repeat_interleave(q3_k.SUB, dim=1)  # (rows, 256)
        entry = codes.reshape(block.shape[0], -1).float() - 4  # (rows, 256) the codes q of the block at entry

        def dequant(x, cols):
            ds = d_col[:, cols]
            q = q4_k.nearest_int(x / ds).clamp(-4, 3)
            return ds * torch.where(ds != 0, q, entry[:, cols])

        return dequant, None


@dataclass(frozen=True)
class GGUFQ2_K(_GGUFBlocks):
    """GGUF Q2_K: 256-weight super-blocks of 16 sub-blocks, 2-bit codes, 4-bit scales/mins (2.625 bits per weight).

    Quantized with llama.cpp's quantize_row_q2_K_ref algorithm; weights that already hold Q2_K values are kept
    (see edgestill.quant.q2_k).
    """

    ggml_type: ClassVar[str] = "Q2_K"
    block_size: ClassVar[int] = q2_k.QK_K
    type_size: ClassVar[int] = q2_k.TYPE_SIZE
    bits_per_weight: ClassVar[float] = 2.625

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        _check_rows(w, self.block_size, "Q2_K")
        return q2_k.fake_quant_q2_k(w.reshape(-1, w.shape[-1])).reshape(w.shape)

    def block_quantizer(self, block: torch.Tensor):
        """One 256-column super-block: llama.cpp's scale/min search at entry, then its final coding rule.

        No weight can be pinned: the scales come from a least-squares search, not from the extremes.
        """
        d, dmin, scales, _ = q2_k.q2_k_codes(block)
        return _affine_k_dequant(d, dmin, scales & 0xF, scales >> 4, q2_k.SUB, 3), None


# --- ONNX Runtime formats ------------------------------------------------------------------------------

def int8_per_channel_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (N, K) and float32 scales (N,) of a (N, K) weight; zero point 0 (not stored)."""
    w = w.detach().to(torch.float32)
    scale = f32_div(w.abs().amax(-1), 127)  # (N,) == ORT's 2*absmax / 254, computed in float64 then rounded
    scale = torch.where(scale < torch.finfo(torch.float32).tiny, 1.0, scale)  # ORT's guard for a zero row
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # numpy round: half to even
    return q, scale


@dataclass(frozen=True)
class Int8PerChannel:
    """int8 symmetric, one float32 scale per output channel (ONNX DequantizeLinear, axis 0).

    `bits_per_weight` leaves out the per-row scale (4 bytes a row); `weight_bytes` counts it.
    """

    block_size: ClassVar[None] = None  # the whole row
    bits_per_weight: ClassVar[float] = 8.0

    def supports(self, in_features: int) -> bool:
        return True

    def weight_bytes(self, shape: tuple[int, int]) -> int:
        return shape[0] * shape[1] + 4 * shape[0]

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        q, scale = int8_per_channel_codes(w.reshape(-1, w.shape[-1]))
        return (q.float() * scale[:, None]).reshape(w.shape)

    def block_quantizer(self, block: torch.Tensor):
        scale = f32_div(block.abs().amax(-1, keepdim=True), 127)  # (rows, 1), the whole row
        scale = torch.where(scale < torch.finfo(torch.float32).tiny, 1.0, scale)

        def dequant(x, cols):
            return torch.round(x / scale).clamp(-127, 127).to(torch.int8).float() * scale

        return dequant, block.abs().argmax(-1, keepdim=True)


@dataclass(frozen=True)
class Int4Block:
    """MatMulNBits 4-bit blocks along K with float32 scales: symmetric (zero point 8) or explicit zero points.

    Layout assumed for export (the contrib op's documented inputs, bits=4):
      B           uint8 (N, k_blocks, block_size/2): weight 2i of a block in the low nibble of byte i,
                  weight 2i+1 in the high nibble; a last partial block is padded with code 0.
      scales      float32 (N, k_blocks)
      zero_points uint8 (N, ceil(k_blocks/2)), two 4-bit zero points a byte, low nibble first;
                  absent when symmetric (the op then uses 8).
    """

    block_size: int = 32
    symmetric: bool = True

    def __post_init__(self):
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise EdgestillError(f"Int4Block(block_size={self.block_size}): "
                                 "MatMulNBits needs a power of 2 >= 16")

    @property
    def bits_per_weight(self) -> float:
        return 4 + 32 / self.block_size + (0 if self.symmetric else 4 / self.block_size)

    def supports(self, in_features: int) -> bool:
        return True  # a last partial block is part of the op (k_blocks = ceil(K / block_size))

    def weight_bytes(self, shape: tuple[int, int]) -> int:
        k_blocks = math.ceil(shape[1] / self.block_size)
        zero_point_bytes = 0 if self.symmetric else shape[0] * math.ceil(k_blocks / 2)
        return shape[0] * k_blocks * (self.block_size // 2 + 4) + zero_point_bytes

    def codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes uint8 (N, k_blocks, block_size), scales float32 and zero points uint8 (N, k_blocks).

        A partial last block is zero-padded: zeros never change its scale (the asymmetric range
        always includes 0, and a 0 never beats a block's largest magnitude), which is also what
        ORT's Python quantizer does; the padded codes are dropped on dequantization.
        """
        n, k = w.shape
        k_blocks = math.ceil(k / self.block_size)
        x = torch.nn.functional.pad(w.detach().to(torch.float32), (0, k_blocks * self.block_size - k))
        x = x.reshape(n, k_blocks, self.block_size)  # (N, k_blocks, block)
        if self.symmetric:
            bmin, bmax = x.amin(-1), x.amax(-1)
            signed_max = torch.where(bmax.abs() > bmin.abs(), bmax, bmin)  # MLAS range2scale
            scale = f32_div(signed_max, -8)
            zero_point = torch.full_like(scale, 8)
        else:
            bmin, bmax = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)  # MLAS range2scalezp
            scale = f32_div(bmax - bmin, 15)
            zp = torch.where(scale != 0, -(bmin / torch.where(scale != 0, scale, 1.0)), bmin)
            zero_point = _round_half_away(zp.clamp(0, 15))
        q = _round_half_away(x * _inverse(scale)[..., None] + zero_point[..., None]).clamp(0, 15)
        return q.to(torch.uint8), scale, zero_point.to(torch.uint8)

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        flat = w.reshape(-1, w.shape[-1])
        q, scale, zero_point = self.codes(flat)
        w_hat = (q.float() - zero_point.float()[..., None]) * scale[..., None]  # the op's (q - zp) * scale
        return w_hat.reshape(flat.shape[0], -1)[:, : flat.shape[1]].reshape(w.shape)

    def block_quantizer(self, block: torch.Tensor):
        _, scale, zero_point = self.codes(block)  # (rows, 1) each: the block (a partial last one is padded)
        inv, zp = _inverse(scale), zero_point.float()

        def dequant(x, cols):
            q = _round_half_away(x * inv + zp).clamp(0, 15).to(torch.uint8)
            return (q.float() - zp) * scale

        lo, hi = block.argmin(-1, keepdim=True), block.argmax(-1, keepdim=True)
        if self.symmetric:  # MLAS: the max if |max| > |min|, else the min
            bmin, bmax = block.gather(-1, lo).clamp(max=0), block.gather(-1, hi).clamp(min=0)
            return dequant, torch.where(bmax.abs() > bmin.abs(), hi, lo)
        return dequant, torch.cat([lo, hi], -1)


def pack_matmul_nbits(w: torch.Tensor, fmt: Int4Block) -> dict[str, np.ndarray | None]:
    """MatMulNBits inputs B, scales, zero_points of a (N, K) weight, in the layout Int4Block documents."""
    q, scale, zero_point = fmt.codes(w)
    n, k_blocks, _ = q.shape
    k = w.shape[1]
    q = q.reshape(n, -1)
    q[:, k:] = 0  # padding codes of a partial last block
    q = q.reshape(n, k_blocks, fmt.block_size // 2, 2).cpu().numpy()
    packed = q[..., 0] | (q[..., 1] << 4)  # (N, k_blocks, block_size/2)
    zero_points = None
    if not fmt.symmetric:
        zp = zero_point.cpu().numpy()
        zp = np.pad(zp, ((0, 0), (0, k_blocks % 2)))  # an odd count leaves the last high nibble 0
        zero_points = zp[:, 0::2] | (zp[:, 1::2] << 4)  # (N, ceil(k_blocks/2))
    return {"B": packed, "scales": scale.cpu().numpy(), "zero_points": zero_points}


# --- the registry: every format, and what edgestill may do with it ----------------------------------------

@dataclass(frozen=True)
class FormatSpec:
    """One format of the registry: its short name, its class, and what each part of edgestill may do with it.

    name          what recipes, the CLI and plans call it (`quant.format: q4_0`, `--type q4_0`); for a GGUF
                  format also the GGUF export's tensor type, its ggml type in lower case
    cls           the Format class (`cls()` is the format with its default settings)
    file_type     GGUF: general.file_type (a gguf.LlamaFileType name) of a file whose 2-D weights are mostly
                  in this format, as llama.cpp labels it
    vec_dot_type  GGUF: what llama.cpp's CPU backend rounds a matmul input to for weights in this format
                  (ggml-cpu.c type_traits_cpu: q8_0, q8_1, q8_k or f16); QuantConfig(activations="llama.cpp")
    scale_fields  GGUF: fp16 fields (the scale, then the min) of every block, `scale_offset` bytes into it
    scale_offset  GGUF: where they start: 0 (they open the block) but for Q3_K and Q2_K, which store them last
    fallback      GGUF: the format llama.cpp stores a row in when this format's block does not divide it
                  (its K-quant rule; F16 when that block does not divide it either); None: F16 directly
    qat           fake-quantized every training step on a CPU: recipes' quant.format / quant.plan and
                  `edgestill quantize --type` take it (config.validate)
    gptq          gptq_quantize_ quantizes with it (its block_quantizer)
    onnx          export_onnx stores it with an exact ONNX operator (`edgestill export --format onnx --type`)
    plan          the planner and the cost model price it (plan/cost.py prices llama.cpp: GGUF formats only)
    plan_default  a default candidate of `edgestill plan`, `shrink --device` and `sweep` (students are
                  trained in it, so it needs qat)
    hostbench     the host benchmark times llama.cpp on it (plan/hostbench.py)
    """

    name: str
    cls: type
    file_type: str | None = None
    vec_dot_type: str | None = None
    scale_fields: int = 0
    scale_offset: int = 0
    fallback: str | None = None
    qat: bool = False
    gptq: bool = False
    onnx: bool = False
    plan: bool = False
    plan_default: bool = False
    hostbench: bool = False

    @property
    def ggml_type(self) -> str | None:
        """GGUF: the ggml tensor type (a gguf.GGMLQuantizationType name such as 'Q4_0'); None otherwise."""
        return getattr(self.cls, "ggml_type", None)

    @property
    def gguf(self) -> bool:
        """Stored in GGUF files (llama.cpp runs it)."""
        return self.ggml_type is not None

    @property
    def quantized(self) -> bool:
        """Fewer bits than fp16."""
        return self.cls().bits_per_weight < 16


# GGUF formats from the most bits per weight to the fewest, then ONNX Runtime's own formats. Every list
# derived from the registry keeps this order (CLI choices, the planner's default candidates, host benchmark).
REGISTRY: tuple[FormatSpec, ...] = (
    FormatSpec("f16", GGUFF16, file_type="MOSTLY_F16", vec_dot_type="f16",
               qat=True, gptq=True, plan=True, hostbench=True),
    FormatSpec("q8_0", GGUFQ8_0, file_type="MOSTLY_Q8_0", vec_dot_type="q8_0", scale_fields=1,
               qat=True, gptq=True, onnx=True, plan=True, plan_default=True, hostbench=True),
    FormatSpec("q5_1", GGUFQ5_1, file_type="MOSTLY_Q5_1", vec_dot_type="q8_1", scale_fields=2,
               qat=True, gptq=True, plan=True, hostbench=True),
    FormatSpec("q5_0", GGUFQ5_0, file_type="MOSTLY_Q5_0", vec_dot_type="q8_0", scale_fields=1,
               qat=True, gptq=True, plan=True, plan_default=True, hostbench=True),
    FormatSpec("q4_1", GGUFQ4_1, file_type="MOSTLY_Q4_1", vec_dot_type="q8_1", scale_fields=2,
               qat=True, gptq=True, plan=True, hostbench=True),
    FormatSpec("q4_0", GGUFQ4_0, file_type="MOSTLY_Q4_0", vec_dot_type="q8_0", scale_fields=1,
               qat=True, gptq=True, onnx=True, plan=True, plan_default=True, hostbench=True),
    # Not qat: its scale search (q4_k.py) took ~10 s per layer of a 135M model on 2 cores when this was decided;
    # it now runs step by step over all sub-blocks at once, ~0.2 us per weight on one core, but llama.cpp's
    # quantizer is not idempotent and q4_k.py (unlike q3_k.py, q2_k.py) does not keep weights that already hold
    # Q4_K values, which a QAT export needs. File type: of llama-quantize's Q4_K mixes, Q4_K_S is the one with
    # (nearly) every matrix in Q4_K, as this export has.
    FormatSpec("q4_k", GGUFQ4_K, file_type="MOSTLY_Q4_K_S", vec_dot_type="q8_k", scale_fields=2, fallback="q5_0",
               gptq=True, plan=True, hostbench=True),
    # Below 4 bits, for QAT: ~0.1 (q3_k) and ~0.2 (q2_k) us per weight on one core, ~10-30x Q4_0's, and weights
    # that already hold their values are kept (q3_k.py, q2_k.py), so a QAT export stores the trained weights.
    # Neither is a default candidate of the planner nor timed by the host benchmark (the cost model prices them
    # from the device's compute rate when asked). File types: Q3_K_S is the Q3_K mix with every matrix in Q3_K;
    # in the Q2_K mix llama-quantize puts attn_v, attn_output and ffn_down in Q3_K, in Q2_K_S (nearly) every
    # matrix stays Q2_K, as this export has. Fallback: llama_tensor_get_type's Q2_K/Q3_K -> Q4_0 (then F16).
    FormatSpec("q3_k", GGUFQ3_K, file_type="MOSTLY_Q3_K_S", vec_dot_type="q8_k", scale_fields=1, scale_offset=108,
               fallback="q4_0", qat=True, gptq=True, plan=True),
    FormatSpec("q2_k", GGUFQ2_K, file_type="MOSTLY_Q2_K_S", vec_dot_type="q8_k", scale_fields=2, scale_offset=80,
               fallback="q4_0", qat=True, gptq=True, plan=True),
    FormatSpec("int8", Int8PerChannel, gptq=True, onnx=True),
    FormatSpec("int4", Int4Block, gptq=True, onnx=True),
)

FORMATS = tuple(spec.cls for spec in REGISTRY)
GGUF_FORMATS = tuple(spec.cls for spec in REGISTRY if spec.gguf)
Format = Union[FORMATS]  # every format config (a typing alias built from the registry)
# Short names for recipes and the CLI (`quant.format: q4_0`, `--quant q4_0`).
FORMAT_NAMES: dict[str, type] = {spec.name: spec.cls for spec in REGISTRY}
_SPEC_OF_NAME = {spec.name: spec for spec in REGISTRY}
_SPEC_OF_CLASS = {spec.cls: spec for spec in REGISTRY}
_CLASS_NAMES = {spec.cls.__name__: spec.cls for spec in REGISTRY}
_CAPABILITIES = ("gguf", "quantized", "qat", "gptq", "onnx", "plan", "plan_default", "hostbench")


def format_names(**capabilities: bool) -> tuple[str, ...]:
    """Short names of the formats that have all these capabilities, in registry order.

    format_names(qat=True) -> ('f16', 'q8_0', ...); format_names(gguf=True); format_names(onnx=True, gguf=False).
    Capabilities: gguf, quantized and FormatSpec's flags (qat, gptq, onnx, plan, plan_default, hostbench).
    """
    unknown = set(capabilities) - set(_CAPABILITIES)
    if unknown:
        raise TypeError(f"format_names: unknown capabilities {sorted(unknown)}; use {', '.join(_CAPABILITIES)}")
    return tuple(spec.name for spec in REGISTRY
                 if all(getattr(spec, key) == bool(value) for key, value in capabilities.items()))


def format_spec(fmt) -> FormatSpec:
    """The registry entry of a format: a Format, a Format class, or a name (`q4_0`, any case, or 'Q4_0')."""
    if isinstance(fmt, type) and fmt in _SPEC_OF_CLASS:
        return _SPEC_OF_CLASS[fmt]
    if type(fmt) in _SPEC_OF_CLASS:
        return _SPEC_OF_CLASS[type(fmt)]
    spec = _SPEC_OF_NAME.get(str(fmt).lower()) if isinstance(fmt, str) else None
    if spec is None:
        raise EdgestillError(f"unknown quantization format '{fmt}'; choose one of {', '.join(FORMAT_NAMES)}")
    return spec


def resolve_format(fmt: Format, in_features: int) -> tuple[Format, str | None]:
    """The format a row of `in_features` weights is actually stored in, and why if it is not `fmt`.

    Q4_K -> Q5_0 -> F16 and Q3_K, Q2_K -> Q4_0 -> F16 are llama.cpp's own rule (llama-quant.cpp,
    llama_tensor_get_type: a K-quant whose super-block does not divide the row becomes Q2_K/Q3_K->Q4_0,
    Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, and F16 if that block does not divide it either; checked against
    llama-cpp-python 0.3.36's llama-quantize). For the 32-weight formats llama-quantize has no
    fallback (it stops with "Unsupported tensor size encountered"); convert_hf_to_gguf.py stores
    such tensors as F16, and so do we. The ONNX formats never need one.
    """
    if fmt.supports(in_features):
        return fmt, None
    why = f"rows of {in_features} weights are not a multiple of {fmt.ggml_type}'s block of {fmt.block_size}"
    fallback = format_spec(fmt).fallback  # the formats with one are llama.cpp's K-quants
    if fallback is not None and format_by_name(fallback).supports(in_features):
        stored = format_by_name(fallback)
        return stored, f"{why}; {stored.ggml_type} as llama.cpp's llama_tensor_get_type does"
    source = "llama.cpp's rule for K-quants" if fallback is not None else "what convert_hf_to_gguf.py does"
    return GGUFF16(), f"{why}; F16, {source}"


def gguf_quantize(w: torch.Tensor, fmt: Format):
    """The tensor data a GGUF file stores for `w` in `fmt`, and its GGMLQuantizationType.

    uint8 (rows, bytes per row) for quantized types, float16 for F16, as gguf.quants.quantize and
    GGUFWriter.add_tensor(..., raw_dtype=qtype) expect. Call resolve_format first for odd rows.
    """
    from gguf import GGMLQuantizationType, quants

    if not isinstance(fmt, GGUF_FORMATS):
        raise EdgestillError(f"{fmt} is not a GGUF format")
    if not fmt.supports(w.shape[-1]):
        raise EdgestillError(f"{fmt} cannot store rows of {w.shape[-1]} weights; use resolve_format")
    qtype = GGMLQuantizationType[fmt.ggml_type]
    packer = {GGUFQ4_K: q4_k.pack_q4_k, GGUFQ3_K: q3_k.pack_q3_k, GGUFQ2_K: q2_k.pack_q2_k}.get(type(fmt))
    if packer is not None:  # the K-quants: the gguf package only dequantizes them
        return packer(w.reshape(-1, w.shape[-1])).reshape(*w.shape[:-1], -1), qtype
    return quants.quantize(w.detach().to(torch.float32).cpu().numpy(), qtype), qtype


def format_to_dict(fmt: Format) -> dict[str, Any]:
    return {"format": type(fmt).__name__, **dataclasses.asdict(fmt)}


def format_from_dict(data: dict[str, Any] | str) -> Format:
    """Inverse of format_to_dict; a bare class name ("GGUFQ4_K") or short name ("q4_k", any case) is accepted too."""
    data = {"format": data} if isinstance(data, str) else dict(data)
    name = data.pop("format", None)
    cls = (_CLASS_NAMES.get(name) or FORMAT_NAMES.get(name.lower())) if isinstance(name, str) else None
    if cls is None:
        raise EdgestillError(f"unknown quantization format {name!r}; choose one of {', '.join(FORMAT_NAMES)} "
                             f"(or a class name: {', '.join(_CLASS_NAMES)})")
    try:
        return cls(**data)
    except TypeError as e:
        raise EdgestillError(f"{cls.__name__}: {e}") from None


def format_by_name(name: str) -> Format:
    """`q4_0` -> GGUFQ4_0(); the names recipes use."""
    return format_spec(str(name)).cls()


def format_name(fmt: Format) -> str:
    """GGUFQ4_0() -> 'q4_0' (the names recipes and plans use)."""
    return format_spec(fmt).name


def as_format(value: Format | str | dict[str, Any]) -> Format:
    """A format from any way edgestill writes one: a Format, a short name (`q4_0`), a class name or format_to_dict's dict."""
    return value if isinstance(value, FORMATS) else format_from_dict(value)
