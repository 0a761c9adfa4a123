"""Shades of Gray colour constancy (Finlayson & Trezzi 2004), as the ISIC 2018/2019 winners preprocessed.

Dermoscopes and clinics differ in their light: the same lesion comes out redder or bluer. Shades of Gray
estimates each image's illuminant as the Minkowski p-norm mean of each channel (p=1 is grey world, p=inf
max-RGB; p=6 is what the ISIC winners used) and scales the channels so that the illuminant becomes grey,
keeping its length. It runs in torch on the device, inside the model's normalisation, so training,
evaluation, predict, explain and the exported ONNX graph apply the very same arithmetic.
"""

from __future__ import annotations

import math

import torch

from skinlesion.errors import ConfigError


def check_power(power: float | None, setting: str = "module.colour_constancy") -> float | None:
    """The p-norm as a float (None = off); a ConfigError for anything that is not a finite number >= 1."""
    if power is None:
        return None
    if isinstance(power, bool) or not isinstance(power, int | float) or not math.isfinite(power) or power < 1:
        shown = f"{power:g}" if isinstance(power, int | float) and not isinstance(power, bool) else repr(power)
        raise ConfigError(
            f"{setting}={shown} is not valid: give Shades of Gray's p-norm, a number >= 1 (6 as the ISIC "
            "2018/2019 winners, 1 = grey world), or null for no colour constancy"
        )
    return float(power)


def shades_of_gray(pixels: torch.Tensor, power: float) -> torch.Tensor:
    """Float NCHW pixels in 0..255 -> the same with each image's estimated illuminant made grey, clipped to
    0..255. Gains are ``1 / (sqrt(3) * e / |e|)`` for the illuminant ``e``: a grey illuminant keeps its pixels."""
    scaled = pixels / 255  # 255**6 in float32 is fine, but larger p would overflow
    illuminant = scaled.pow(power).mean(dim=(2, 3), keepdim=True).pow(1 / power)
    unit = illuminant / torch.linalg.vector_norm(illuminant, dim=1, keepdim=True).clamp_min(1e-6)
    gains = 1 / (math.sqrt(3) * unit).clamp_min(1e-6)
    return (pixels * gains).clamp(0, 255)
