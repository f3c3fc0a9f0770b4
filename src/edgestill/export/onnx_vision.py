"""An image tower (models/vision.py) as an ONNX file: float, or static int8 in QDQ form.

float: torch.onnx's exporter (dynamo, opset 21), input `image` (batch, channels, size, size) float32 in [0, 1],
    output `embedding` (batch, dim), unit length; the batch dimension is dynamic.
int8: onnxruntime's static quantizer with per-channel int8 weights and per-tensor int8 activations, ranges
    calibrated on training images (export/onnx_series.quantize_int8, shared with the series track).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgestill.errors import EdgestillError
from edgestill.export.onnx_series import compact, quantize_int8
from edgestill.files import atomic_path

INPUT, OUTPUT = "image", "embedding"
NAMES = (INPUT, OUTPUT)


def export_float(model: nn.Module, channels: int, size: int, path: str | Path) -> Path:
    from torch.export import Dim

    path = Path(path)
    example = torch.zeros(2, channels, size, size)
    for name in ("torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with atomic_path(path, "writing the ONNX model") as tmp:
        try:
            torch.onnx.export(model.eval(), (example,), str(tmp), input_names=[INPUT], output_names=[OUTPUT],
                              dynamo=True, opset_version=21, dynamic_shapes=({0: Dim("batch", min=1, max=65536)},),
                              external_data=False, verbose=False)
        except Exception as e:
            raise EdgestillError(f"ONNX export of {model.__class__.__name__} failed: {e.__class__.__name__}: "
                                 f"{str(e).splitlines()[0][:200]}") from None
        compact(Path(tmp), NAMES)
    return path


def export_int8(float_path: str | Path, path: str | Path, calibration: np.ndarray) -> Path:
    return quantize_int8(float_path, path, calibration, NAMES)


def onnx_embed(session, x: np.ndarray, batch: int = 512) -> np.ndarray:
    out = [session.run([OUTPUT], {INPUT: np.ascontiguousarray(x[i:i + batch], np.float32)})[0]
           for i in range(0, len(x), batch)]
    return np.concatenate(out)
