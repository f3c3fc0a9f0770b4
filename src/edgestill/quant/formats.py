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
    (or `(x-min)/d + 0.5`); Q8_0 rounds half away from zero. GGUFQ4_K is in `q4_k.py`.
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
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import numpy as np
import torch

from edgestill.errors import EdgestillError
from edgestill.quant import q4_k


# --- float32 helpers that match C and numpy exactly ------------------------------------------------

def _div(a: torch.Tensor, b: float) -> torch.Tensor:
    """a / b rounded once. (`t / 3.0` with a Python scalar multiplies by a rounded reciprocal on CUDA.)"""
    return a / torch.tensor(b, dtype=torch.float32, device=a.device)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d is 0: the `id = d ? 1.0f/d : 0.0f` of every ggml quantizer."""
    return torch.where(d == 0, 0.0, torch.ones_like(d) / d)


def _fp16(x: torch.Tensor) -> torch.Tensor:
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
    d = _div(blocks.abs().amax(-1, keepdim=True), 127)  # (n, 1)
    q = _round_half_away(blocks * _inverse(d)).to(torch.int8)
    return (q.float() * _fp16(d)).reshape(w.shape)


def _q4_0(w: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(w, 32, "Q4_0")
    d = _div(_signed_absmax(blocks), -8)  # the signed max maps to code 0, i.e. to -8 * d
    q = torch.trunc(blocks * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return (_fp16(d) * (q.to(torch.int8) - 8).float()).reshape(w.shape)


def _q5_0(w: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(w, 32, "Q5_0")
    d = _div(_signed_absmax(blocks), -16)
    q = torch.trunc(blocks * _inverse(d) + 16.5).clamp(0, 31).to(torch.uint8)
    return (_fp16(d) * (q.to(torch.int8) - 16).float()).reshape(w.shape)


def _affine(w: torch.Tensor, levels: int, name: str) -> torch.Tensor:
    """Q4_1 (levels 15) and Q5_1 (levels 31): d = (max - min) / levels, w_hat = d * q + min."""
    blocks = _blocks(w, 32, name)
    bmin, bmax = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)  # (n, 1)
    d = _div(bmax - bmin, levels)
    q = torch.trunc((blocks - bmin) * _inverse(d) + 0.5).clamp(0, levels).to(torch.uint8)
    return (_fp16(d) * q.float() + _fp16(bmin)).reshape(w.shape)


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
        return _fp16(w.detach())


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


@dataclass(frozen=True)
class GGUFQ4_0(_GGUFBlocks):
    """GGUF Q4_0: 32 4-bit codes + an fp16 scale per block (4.5 bits per weight), symmetric."""

    ggml_type: ClassVar[str] = "Q4_0"
    block_size: ClassVar[int] = 32
    type_size: ClassVar[int] = 18
    bits_per_weight: ClassVar[float] = 4.5

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return _q4_0(w)


@dataclass(frozen=True)
class GGUFQ4_1(_GGUFBlocks):
    """GGUF Q4_1: 32 4-bit codes + fp16 scale and min per block (5.0 bits per weight)."""

    ggml_type: ClassVar[str] = "Q4_1"
    block_size: ClassVar[int] = 32
    type_size: ClassVar[int] = 20
    bits_per_weight: ClassVar[float] = 5.0

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return _affine(w, 15, "Q4_1")


@dataclass(frozen=True)
class GGUFQ5_0(_GGUFBlocks):
    """GGUF Q5_0: 32 5-bit codes + an fp16 scale per block (5.5 bits per weight), symmetric."""

    ggml_type: ClassVar[str] = "Q5_0"
    block_size: ClassVar[int] = 32
    type_size: ClassVar[int] = 22
    bits_per_weight: ClassVar[float] = 5.5

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return _q5_0(w)


@dataclass(frozen=True)
class GGUFQ5_1(_GGUFBlocks):
    """GGUF Q5_1: 32 5-bit codes + fp16 scale and min per block (6.0 bits per weight)."""

    ggml_type: ClassVar[str] = "Q5_1"
    block_size: ClassVar[int] = 32
    type_size: ClassVar[int] = 24
    bits_per_weight: ClassVar[float] = 6.0

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return _affine(w, 31, "Q5_1")


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


# --- ONNX Runtime formats ------------------------------------------------------------------------------

def int8_per_channel_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (N, K) and float32 scales (N,) of a (N, K) weight; zero point 0 (not stored)."""
    w = w.detach().to(torch.float32)
    scale = _div(w.abs().amax(-1), 127)  # (N,) == ORT's 2*absmax / 254, computed in float64 then rounded
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
            scale = _div(signed_max, -8)
            zero_point = torch.full_like(scale, 8)
        else:
            bmin, bmax = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)  # MLAS range2scalezp
            scale = _div(bmax - bmin, 15)
            zp = torch.where(scale != 0, -(bmin / torch.where(scale != 0, scale, 1.0)), bmin)
            zero_point = _round_half_away(zp.clamp(0, 15))
        q = _round_half_away(x * _inverse(scale)[..., None] + zero_point[..., None]).clamp(0, 15)
        return q.to(torch.uint8), scale, zero_point.to(torch.uint8)

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        flat = w.reshape(-1, w.shape[-1])
        q, scale, zero_point = self.codes(flat)
        w_hat = (q.float() - zero_point.float()[..., None]) * scale[..., None]  # the op's (q - zp) * scale
        return w_hat.reshape(flat.shape[0], -1)[:, : flat.shape[1]].reshape(w.shape)


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


# --- every format, fallbacks, GGUF bytes -----------------------------------------------------------

Format = Union[GGUFF16, GGUFQ8_0, GGUFQ4_0, GGUFQ4_1, GGUFQ5_0, GGUFQ5_1, GGUFQ4_K, Int8PerChannel, Int4Block]
FORMATS = (GGUFF16, GGUFQ8_0, GGUFQ4_0, GGUFQ4_1, GGUFQ5_0, GGUFQ5_1, GGUFQ4_K, Int8PerChannel, Int4Block)
GGUF_FORMATS = (GGUFF16, GGUFQ8_0, GGUFQ4_0, GGUFQ4_1, GGUFQ5_0, GGUFQ5_1, GGUFQ4_K)


def resolve_format(fmt: Format, in_features: int) -> tuple[Format, str | None]:
    """The format a row of `in_features` weights is actually stored in, and why if it is not `fmt`.

    Q4_K -> Q5_0 -> F16 is llama.cpp's own rule (llama-quant.cpp, llama_tensor_get_type: a K-quant
    whose super-block does not divide the row becomes Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, and F16
    if that block does not divide it either). For the 32-weight formats llama-quantize has no
    fallback (it stops with "Unsupported tensor size encountered"); convert_hf_to_gguf.py stores
    such tensors as F16, and so do we. The ONNX formats never need one.
    """
    if fmt.supports(in_features):
        return fmt, None
    why = f"rows of {in_features} weights are not a multiple of {fmt.ggml_type}'s block of {fmt.block_size}"
    if isinstance(fmt, GGUFQ4_K) and GGUFQ5_0().supports(in_features):
        return GGUFQ5_0(), f"{why}; Q5_0 as llama.cpp's llama_tensor_get_type does"
    is_k_quant = isinstance(fmt, GGUFQ4_K)
    source = "llama.cpp's rule for K-quants" if is_k_quant else "what convert_hf_to_gguf.py does"
    return GGUFF16(), f"{why}; F16, {source}"


def gguf_quantize(w: torch.Tensor, fmt: Format):
    """The tensor data a GGUF file stores for `w` in `fmt`, and its GGMLQuantizationType.

    uint8 (rows, bytes per row) for quantized types, float16 for F16, as gguf.quants.quantize and
    GGUFWriter.add_tensor(..., raw_dtype=qtype) expect. Call resolve_format first for odd rows.
    """
    from gguf import GGMLQuantizationType
    from gguf import quants

    if not isinstance(fmt, GGUF_FORMATS):
        raise EdgestillError(f"{fmt} is not a GGUF format")
    if not fmt.supports(w.shape[-1]):
        raise EdgestillError(f"{fmt} cannot store rows of {w.shape[-1]} weights; use resolve_format")
    qtype = GGMLQuantizationType[fmt.ggml_type]
    if isinstance(fmt, GGUFQ4_K):
        return q4_k.pack_q4_k(w.reshape(-1, w.shape[-1])).reshape(*w.shape[:-1], -1), qtype
    return quants.quantize(w.detach().to(torch.float32).cpu().numpy(), qtype), qtype


def format_to_dict(fmt: Format) -> dict[str, Any]:
    return {"format": type(fmt).__name__, **dataclasses.asdict(fmt)}


def format_from_dict(data: dict[str, Any] | str) -> Format:
    """Inverse of format_to_dict; a bare class name ("GGUFQ4_K") is accepted too."""
    data = {"format": data} if isinstance(data, str) else dict(data)
    by_name = {cls.__name__: cls for cls in FORMATS}
    name = data.pop("format", None)
    if name not in by_name:
        raise EdgestillError(f"unknown quantization format {name!r}; choose one of {', '.join(by_name)}")
    try:
        return by_name[name](**data)
    except TypeError as e:
        raise EdgestillError(f"{name}: {e}") from None


# Short names for recipes and the CLI (`quant.format: q4_0`, `--quant q4_0`).
FORMAT_NAMES: dict[str, type] = {
    "f16": GGUFF16, "q8_0": GGUFQ8_0, "q4_0": GGUFQ4_0, "q4_1": GGUFQ4_1, "q5_0": GGUFQ5_0,
    "q5_1": GGUFQ5_1, "q4_k": GGUFQ4_K, "int8": Int8PerChannel, "int4": Int4Block,
}


def format_by_name(name: str) -> Format:
    """`q4_0` -> GGUFQ4_0(); the names recipes use."""
    cls = FORMAT_NAMES.get(str(name).lower())
    if cls is None:
        raise EdgestillError(f"unknown quantization format '{name}'; choose one of {', '.join(FORMAT_NAMES)}")
    return cls()
