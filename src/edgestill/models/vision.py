"""The vision track's models: a CLIP-style image tower (teacher and student alike, of different widths) whose
unit-length embedding lives in the text encoder's space, and the text side: class-name prompts embedded once by
the frozen sentence encoder (all-MiniLM-L6-v2, mean pooling, unit length, as sentence-transformers does).

    image (n, c, s, s) -> [conv3x3 -> ReLU] x convs, max-pool 2  (one stage per width; no pool after the last)
                       -> global average pool -> linear -> L2 normalise -> (n, dim)

No normalisation layers: the student's int8 file then holds exactly the convolutions and the linear layer that
were trained with fake quantization (quant/qat_int8.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgestill.errors import EdgestillError

PROMPT = "a photo of the number {}."


@dataclass
class ImageTowerConfig:
    widths: list[int] = field(default_factory=lambda: [16, 32, 48])
    convs: int = 1  # convolutions per stage

    def check(self, who: str) -> None:
        if not self.widths or min(self.widths) < 1 or self.convs < 1:
            raise EdgestillError(f"{who}.widths={self.widths} needs at least one width >= 1 and {who}.convs >= 1")


class ImageTower(nn.Module):
    def __init__(self, channels: int, dim: int, cfg: ImageTowerConfig):
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for i, w in enumerate(cfg.widths):
            for _ in range(cfg.convs):
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU()]
                c = w
            if i < len(cfg.widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(c, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean(dim=(2, 3))
        return F.normalize(self.proj(h), dim=-1)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def embed_images(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    model.eval()
    out = [model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size]))) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def prompt_embeddings(encoder: str, classes: list[str], template: str = PROMPT) -> np.ndarray:
    """(len(classes), hidden) unit-length sentence embeddings of `template` filled with each class name."""
    from transformers import AutoModel, AutoTokenizer

    from edgestill.models.encoder import resolve_encoder

    if not classes:
        raise EdgestillError("the class list is empty: zero-shot classification needs class names")
    if "{}" not in template:
        raise EdgestillError(f"text.template={template!r} has no '{{}}' for the class name, e.g. 'a photo of a {{}}.'")
    path = resolve_encoder(encoder)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, use_safetensors=True).eval()
    enc = tokenizer([template.format(c) for c in classes], padding=True, return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return F.normalize(pooled, dim=-1).numpy()
