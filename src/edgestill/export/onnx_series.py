"""A sequence regressor (models/sequence.py) as an ONNX file: float, or static int8 in QDQ form.

float: torch.onnx's exporter (dynamo, opset 21), input `window` (batch, window, sensors) float32, output `rul`
    (batch,) in cycles; the batch dimension is dynamic.
int8: onnxruntime's own static quantizer (quantize_static, QDQ): int8 weights per output channel, int8
    activations per tensor, their ranges calibrated on training windows. onnxruntime fuses each
    DequantizeLinear -> Conv/Gemm -> QuantizeLinear into an int8 kernel (QLinearConv, QGemm) when it loads the file.

Both files lose the exporter's per-node debug metadata and shape annotations, which for a student of a few
thousand parameters would outweigh its weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgestill.errors import EdgestillError
from edgestill.files import atomic_path

INPUT, OUTPUT = "window", "rul"


def compact(path: Path, names: tuple[str, str] = (INPUT, OUTPUT)) -> None:
    """Drop debug metadata and shape annotations, and shorten internal tensor names (`names`: input, output)."""
    import onnx

    proto = onnx.load(str(path))
    g = proto.graph
    keep = {*names, ""}  # "" marks an omitted optional input
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for init in g.initializer:
        init.name = short(init.name)
    for node in g.node:
        del node.metadata_props[:]
        node.doc_string = ""
        node.name = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del g.value_info[:]
    for info in list(proto.graph.input) + list(proto.graph.output):
        del info.metadata_props[:]
    del proto.metadata_props[:]
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))


def export_float(model: nn.Module, window: int, sensors: int, rul_cap: float, path: str | Path) -> Path:
    """`model` (returning (prediction, feature)) as a float ONNX file predicting RUL in cycles."""
    import logging

    from torch.export import Dim

    from edgestill.models.sequence import PredictionOnly

    path = Path(path)
    wrapper = PredictionOnly(model, rul_cap).eval()
    example = torch.zeros(2, window, sensors)
    for name in ("torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with atomic_path(path, "writing the ONNX model") as tmp:
        try:
            torch.onnx.export(wrapper, (example,), str(tmp), input_names=[INPUT], output_names=[OUTPUT], dynamo=True,
                              opset_version=21, dynamic_shapes=({0: Dim("batch", min=1, max=65536)},),
                              external_data=False, verbose=False)
        except Exception as e:
            raise EdgestillError(f"ONNX export of {model.__class__.__name__} failed: {e.__class__.__name__}: "
                                 f"{str(e).splitlines()[0][:200]}") from None
        compact(Path(tmp))
    return path


class _Calibration:
    def __init__(self, x: np.ndarray, batch: int = 64, name: str = INPUT):
        self.batches = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


def quantize_int8(float_path: str | Path, path: str | Path, calibration: np.ndarray,
                  names: tuple[str, str] = (INPUT, OUTPUT)) -> Path:
    """Static int8 (QDQ) of a float ONNX file, activation ranges calibrated on `calibration` inputs (`names`: the
    file's input and output)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise EdgestillError("int8 calibration needs at least one window")
    reader = type("Reader", (_Calibration, CalibrationDataReader), {})(np.ascontiguousarray(calibration, np.float32),
                                                                      name=names[0])
    path = Path(path)
    with atomic_path(path, "writing the int8 ONNX model") as tmp:
        pre = Path(str(tmp) + ".pre.onnx")
        try:
            quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QInt8)
        finally:
            pre.unlink(missing_ok=True)
        compact(Path(tmp), names)
    return path


def onnx_predict(session, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    """RUL predictions (cycles) of an onnxruntime session over windows `x`."""
    out = [session.run([OUTPUT], {INPUT: np.ascontiguousarray(x[i:i + batch], np.float32)})[0]
           for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)
