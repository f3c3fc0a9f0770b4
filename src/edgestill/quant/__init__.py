"""Weight quantization in the formats the runtimes store, exact to the bit.

    formats.py     one frozen config per format (GGUF Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q3_K/Q2_K/F16, ONNX int8
                   per channel and MatMulNBits int4 blocks): fake_quant, bytes, fallbacks, packing; and
                   REGISTRY, the one list of formats (short names and what each may be used for)
    q4_k.py        llama.cpp's Q4_K quantizer (the gguf package only dequantizes the K-quants), and the
                   search helpers the K-quants share
    q3_k.py        llama.cpp's Q3_K quantizer (3.4375 bits per weight)
    q2_k.py        llama.cpp's Q2_K quantizer (2.625 bits per weight)
    fake_quant.py  quantize_(model, QuantConfig(...), step="prepare" | "convert"): QAT and freezing
    gptq.py        gptq_quantize_(model, QuantConfig(...), calibration): data-aware PTQ, same exact formats

Importing this package loads torch; `gguf` loads only when GGUF bytes are produced.
"""

from edgestill.quant.fake_quant import (
    FakeQuantEmbedding,
    FakeQuantLinear,
    LayerReport,
    QuantConfig,
    fake_quant_ste,
    quantize_,
    total_weight_bytes,
)
from edgestill.quant.formats import (
    FORMATS,
    GGUFF16,
    GGUFQ2_K,
    GGUFQ3_K,
    GGUFQ4_0,
    GGUFQ4_1,
    GGUFQ4_K,
    GGUFQ5_0,
    GGUFQ5_1,
    GGUFQ8_0,
    REGISTRY,
    Format,
    FormatSpec,
    Int4Block,
    Int8PerChannel,
    format_by_name,
    format_names,
    format_spec,
    gguf_quantize,
    int8_per_channel_codes,
    pack_matmul_nbits,
    resolve_format,
)
from edgestill.quant.gptq import gptq_quantize_, rtn_quantize_

__all__ = [
    "FORMATS", "REGISTRY", "FakeQuantEmbedding", "FakeQuantLinear", "Format", "FormatSpec",
    "GGUFF16", "GGUFQ2_K", "GGUFQ3_K", "GGUFQ4_0", "GGUFQ4_1", "GGUFQ4_K", "GGUFQ5_0", "GGUFQ5_1", "GGUFQ8_0",
    "Int4Block", "Int8PerChannel", "LayerReport", "QuantConfig",
    "fake_quant_ste", "format_by_name", "format_names", "format_spec", "gguf_quantize", "gptq_quantize_", "rtn_quantize_", "int8_per_channel_codes", "pack_matmul_nbits", "quantize_",
    "resolve_format", "total_weight_bytes",
]
