"""Derived second views of real images, from a physical sensor model, for when no real paired modality exists.

`low-light`: the same scene captured with a short exposure, as the EMVA 1288 linear camera model describes a
sensor ([emva1288] in docs/references.md). A pixel whose scene value is s in [0, 1] (the first view's value) collects
on average s * electrons_at_white photo-electrons; the count is Poisson (shot noise), the read-out adds Gaussian
dark noise of read_noise electrons, and the ADC maps headroom * electrons_at_white to full scale at `bits` bits,
clipping and rounding. The result is scaled so that white is 1 on average (values run to `headroom`): only the
noise, the clipping and the quantization differ from the first view.
At the default 3 electrons at white, a white pixel's signal-to-noise ratio is about 1.5.

The derived view is a deterministic function of the images and `seed`: every run and every training seed sees
the same capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgestill.errors import EdgestillError

DERIVED_VIEWS = ("low-light",)


@dataclass
class LowLightConfig:
    electrons_at_white: float = 3.0  # mean photo-electrons of a white pixel in the exposure
    read_noise: float = 1.0  # dark (read-out) noise, electrons rms
    bits: int = 8  # ADC resolution
    headroom: float = 2.0  # ADC full scale, in multiples of the white level (gain set to leave highlights room)
    seed: int = 0  # the noise realisation: fixed, like one capture of each scene

    def check(self) -> None:
        if not self.electrons_at_white > 0 or self.read_noise < 0 or not 1 <= self.bits <= 16 or self.headroom < 1:
            raise EdgestillError(f"low_light: electrons_at_white ({self.electrons_at_white}) must be > 0, read_noise "
                                 f"({self.read_noise}) >= 0, bits ({self.bits}) in 1..16 and headroom "
                                 f"({self.headroom}) >= 1")

    def describe(self) -> str:
        return (f"derived: low-light capture of the same images (EMVA 1288 sensor model: Poisson shot noise at "
                f"{self.electrons_at_white:g} electrons at white, {self.read_noise:g} e- read noise, {self.bits}-bit ADC with {self.headroom:g}x headroom)")


def low_light(x: np.ndarray, cfg: LowLightConfig) -> np.ndarray:
    """x: images in [0, 1], any shape -> the same scenes as the low-light sensor captures them, in [0, 1]."""
    cfg.check()
    rng = np.random.default_rng(cfg.seed)
    electrons = rng.poisson(np.clip(x, 0, 1).astype(np.float64) * cfg.electrons_at_white).astype(np.float64)
    electrons += rng.normal(0.0, cfg.read_noise, size=x.shape)
    full = 2 ** cfg.bits - 1
    dn = np.clip(np.round(electrons / (cfg.headroom * cfg.electrons_at_white) * full), 0, full)
    return (dn / full * cfg.headroom).astype(np.float32)


def derive(name: str, x: np.ndarray, low_light_cfg: LowLightConfig) -> np.ndarray:
    if name == "low-light":
        return low_light(x, low_light_cfg)
    raise EdgestillError(f"unknown derived view '{name}': choose one of {', '.join(DERIVED_VIEWS)}, or name the "
                         "sub-folder of a real paired view")
