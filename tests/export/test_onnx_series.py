"""Sequence regressors as ONNX: the float graph matches PyTorch, the int8 graph is real int8 and close."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgestill.export.onnx_series import INPUT, OUTPUT, export_float, onnx_predict, quantize_int8
from edgestill.models.sequence import PredictionOnly, RULConvStudent, SeriesStudentConfig
from edgestill.runtime.onnx import onnx_session

WINDOW, CAP = 20, 125.0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = RULConvStudent(3, WINDOW, SeriesStudentConfig(channels=4, kernel=3, hidden=8)).eval()
    folder = tmp_path_factory.mktemp("onnx")
    x = np.random.default_rng(0).normal(size=(300, WINDOW, 3)).astype(np.float32)
    f32 = export_float(model, WINDOW, 3, CAP, folder / "s.f32.onnx")
    q8 = quantize_int8(f32, folder / "s.onnx", x[:200])
    return model, f32, q8, x


def test_float_graph_matches_pytorch_at_any_batch(exported):
    model, f32, _, x = exported
    session = onnx_session(f32)
    ref = PredictionOnly(model, CAP)(torch.from_numpy(x)).detach().numpy()
    assert np.allclose(onnx_predict(session, x, batch=7), ref, atol=1e-4)  # batches of 7 and a remainder of 6
    assert session.get_inputs()[0].name == INPUT and session.get_outputs()[0].name == OUTPUT


def test_int8_graph_is_quantized_and_close(exported):
    model, f32, q8, x = exported
    proto = onnx.load(str(q8))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "MatMul"} <= ops
    int8 = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8) == 5  # the two convolutions', the trend pooling's and the two linears' weights are int8
    ref = PredictionOnly(model, CAP)(torch.from_numpy(x)).detach().numpy()
    got = onnx_predict(onnx_session(q8), x)
    spread = ref.max() - ref.min()
    err = np.abs(got - ref)
    assert err.max() < 0.1 * spread + 1e-3 and err.max() > 0  # int8: close, but not the float graph
    assert all(not n.name for n in proto.graph.node) and not proto.graph.value_info  # debug names stripped


def test_empty_calibration_refused(exported, tmp_path):
    from edgestill.errors import EdgestillError

    with pytest.raises(EdgestillError, match="calibration"):
        quantize_int8(exported[1], tmp_path / "x.onnx", np.zeros((0, WINDOW, 3), np.float32))
    assert not list(tmp_path.iterdir())
