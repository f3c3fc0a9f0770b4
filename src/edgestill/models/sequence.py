"""Sequence regressors for the prognosis track: a Transformer teacher and a tiny convolutional student.

Both map a window of sensor readings (batch, window, sensors) to (prediction, feature):
- prediction: (batch,) the RUL as a fraction of the cap (0 = failing now, 1 = healthy), the scale both train on;
- feature: (batch, d) the pooled representation before the head, which feature and relation transfer use.

The student is sized for a microcontroller-class budget: ~1-4k parameters, a few KB as int8 ONNX. It is plain
Conv1d + ReLU + pooling over time + Linear, all of which onnxruntime's static int8 quantizer turns into QDQ int8.
Its "trend" pooling adds, to the mean over time, one learned weighted sum over time positions (initialised as a
centred ramp, so it starts as the slope of each channel): a mean alone cannot tell a rising from a falling
reading, which is most of what the remaining life depends on (benchmarks/timeseries_pooling.py measures both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgestill.errors import EdgestillError


@dataclass
class SeriesTeacherConfig:
    d_model: int = 64
    layers: int = 3
    heads: int = 4
    ffn: int = 128
    dropout: float = 0.1


@dataclass
class SeriesStudentConfig:
    channels: int = 12  # first conv's channels; the second has twice as many
    kernel: int = 5
    hidden: int = 24  # 12/24: 2,775 parameters, chosen over 8/16 by validation RMSE (docs/timeseries.md)
    pool: str = "trend"  # mean (over time), or trend: the mean and a learned weighting of the time positions

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        if self.pool not in ("mean", "trend"):
            raise EdgestillError(f"student.pool '{self.pool}': choose mean or trend")


class RULTransformer(nn.Module):
    """Input projection + learned positions + pre-norm Transformer encoder + mean pooling + MLP head."""

    def __init__(self, sensors: int, window: int, cfg: SeriesTeacherConfig = SeriesTeacherConfig()):
        super().__init__()
        self.inp = nn.Linear(sensors, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(1, window, cfg.d_model))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, cfg.ffn, cfg.dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.ReLU(), nn.Linear(cfg.d_model, 1))
        self.feature_dim = cfg.d_model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(self.inp(x) + self.pos[:, : x.shape[1]])
        feat = self.norm(h.mean(dim=1))
        return self.head(feat).squeeze(-1), feat


class RULConvStudent(nn.Module):
    """Two 1-D convolutions (the second dilated) + ReLU, pooling over time (mean, or mean + learned trend), then a
    two-layer head."""

    @staticmethod
    def receptive_field(cfg: SeriesStudentConfig) -> int:
        """Cycles one output position sees: conv (kernel k), then conv (kernel k, dilation 2)."""
        return 1 + (cfg.kernel - 1) * 3

    def __init__(self, sensors: int, window: int, cfg: SeriesStudentConfig = SeriesStudentConfig()):
        super().__init__()
        c, k = cfg.channels, cfg.kernel
        self.conv = nn.Sequential(nn.Conv1d(sensors, c, k), nn.ReLU(), nn.Conv1d(c, 2 * c, k, dilation=2), nn.ReLU())
        positions = window - self.receptive_field(cfg) + 1  # the conv output's length
        if positions < 1:
            raise ValueError(f"window {window} is shorter than the student's receptive field {self.receptive_field(cfg)}")
        self.trend = None
        if cfg.pool == "trend":
            # (positions, 1), not (positions,): a 2-D MatMul weight is what the int8 quantizer can quantize per channel
            self.trend = nn.Parameter((torch.linspace(-1.0, 1.0, positions) / positions).unsqueeze(1))
        self.fc = nn.Sequential(nn.Linear(2 * c * (2 if self.trend is not None else 1), cfg.hidden), nn.ReLU())
        self.out = nn.Linear(cfg.hidden, 1)
        self.feature_dim = cfg.hidden

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x.transpose(1, 2))  # (batch, channels, positions)
        pooled = h.mean(dim=2)
        if self.trend is not None:
            pooled = torch.cat([pooled, (h @ self.trend).squeeze(2)], dim=1)
        feat = self.fc(pooled)
        return self.out(feat).squeeze(-1), feat


class PredictionOnly(nn.Module):
    """The deployable graph: the prediction in cycles (fraction x cap), without the training-only feature output."""

    def __init__(self, model: nn.Module, rul_cap: float):
        super().__init__()
        self.model = model
        self.rul_cap = float(rul_cap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0] * self.rul_cap


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
