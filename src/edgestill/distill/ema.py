"""An exponential moving average of a model's weights (Polyak averaging), the copy that gets validated and kept.

    shadow ← d·shadow + (1 − d)·weights      after every optimizer step,  d = min(decay, (1 + n) / (10 + n))

n counts the updates; the ramp keeps the first steps from averaging in the random-looking start (the schedule of
TensorFlow's ExponentialMovingAverage with num_updates). Small students trained on a few thousand noisy batches
drift from one validation to the next; the average sits between those points ([polyak1992] in docs/references.md).
Only floating-point tensors are averaged; integer buffers (position ids) are the model's own.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from edgestill.errors import EdgestillError


def check_decay(decay: float) -> None:
    """Refuse a decay the average cannot use (train.ema: 0 means no average and never reaches WeightEMA)."""
    if not 0.0 < decay < 1.0:
        raise EdgestillError(f"train.ema={decay} must be in (0, 1) (e.g. 0.998), or 0 for no weight average")


class WeightEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        check_decay(decay)
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def rate(self, updates: int) -> float:
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, updates: int) -> None:
        """Fold the model's current weights in; `updates` = optimizer steps taken before this one."""
        d = self.rate(updates)
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1.0 - d)

    @contextmanager
    def applied(self, model: torch.nn.Module):
        """The model holds the averaged weights inside the block and its own again after it."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(own, strict=False)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.shadow.items()}, str(folder / "ema.safetensors"))

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        path = folder / "ema.safetensors"
        if not path.is_file():
            raise EdgestillError(f"the checkpoint {folder} holds no weight average (it was written with train.ema=0); "
                                 "resume it with train.ema=0, or remove its folder to start again")
        self.shadow = load_file(str(path))
