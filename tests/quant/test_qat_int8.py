import numpy as np
import torch

from edgestill.export.onnx_vision import export_float, export_int8, onnx_embed
from edgestill.models.vision import ImageTower, ImageTowerConfig
from edgestill.quant import qat_int8
from edgestill.runtime.onnx import onnx_session


def test_weight_grid_is_onnxruntimes_symmetric_per_channel_int8():
    w = torch.randn(6, 3, 3, 3)
    q = qat_int8.fake_quant_weight(w)
    scale = w.abs().amax(dim=(1, 2, 3)) / 127
    levels = q / scale[:, None, None, None]
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= 127 + 1e-4
    assert (q - w).abs().max() <= scale.max() / 2 + 1e-6
    w.requires_grad_(True)
    qat_int8.fake_quant_weight(w).sum().backward()
    assert torch.all(w.grad == 1)  # straight through inside the range


def test_activation_ranges_track_and_freeze():
    act = qat_int8.ActivationFakeQuant()
    x = torch.linspace(-1, 3, 101)
    act.train()
    y = act(x)
    assert float(act.lo) == -1 and float(act.hi) == 3
    assert (y - x).abs().max() <= 4 / 255 / 2 + 1e-6 and not torch.equal(y, x)
    act.eval()
    act(torch.full((4,), 100.0))
    assert float(act.hi) == 3  # frozen in eval: 100 clips to the top of the range
    assert float(act(torch.tensor([100.0]))) <= 3 + 1e-5


def test_qat_model_predicts_what_the_int8_onnx_file_computes(tmp_path):
    torch.manual_seed(0)
    model = ImageTower(1, 16, ImageTowerConfig(widths=[4, 8], convs=1))
    x = np.random.default_rng(0).random((64, 1, 12, 12), dtype=np.float32)
    qat = qat_int8.prepare(model)
    qat.train()
    qat(torch.from_numpy(x))  # observe the activation ranges, as training would
    qat.eval()
    plain = qat_int8.to_float(qat, ImageTower(1, 16, ImageTowerConfig(widths=[4, 8], convs=1)))
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters()))
    f = export_float(plain, 1, 12, tmp_path / "m.onnx")
    q = export_int8(f, tmp_path / "m.int8.onnx", x)
    ort_int8 = onnx_embed(onnx_session(q, 1), x)
    with torch.no_grad():
        fake = qat(torch.from_numpy(x)).numpy()
        exact = plain(torch.from_numpy(x)).numpy()
    gap_fake = np.abs(ort_int8 - fake).mean()
    gap_float = np.abs(ort_int8 - exact).mean()
    assert gap_fake < gap_float  # the fake-quantized model is closer to the int8 file than the float one is
