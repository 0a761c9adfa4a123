"""Test-time augmentation: average the probabilities over flips, rotations, ordered crops and scales.

Lesions have no orientation, so the eight symmetries of the square (the dihedral group D4) are all
plausible views of the same lesion; ``views=4`` uses the rotations only, ``views=2`` identity + flip.

Ordered multi-crop evaluation (Gessert et al., ISIC 2018/2019) scores a fixed grid of input-sized crops
of a larger image. The evaluation loaders deliver images at the model's input size, so a larger image is
made on the device: each scale ``s > 1`` resizes the batch to ``s`` times the input size and takes the
ordered crops of the input size from it (a zoom on the same pixels, no new detail); scale 1 is the image
itself. Views come scale by scale, crop by crop, each crop in every flip/rotation, so there are
``flips × Σ_s (1 if s == 1 else crops)`` of them. They are functions of the images alone, so anything
else an image carries (its metadata) is the same for every view.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from skinlesion.errors import ConfigError
from skinlesion.models.module import SkinLesionClassifier

VIEW_COUNTS = (1, 2, 4, 8)
FIVE_CROPS = 5  # the four corners and the centre, in torchvision's five_crop order


def dihedral_views(images: torch.Tensor, views: int = 8) -> Iterator[torch.Tensor]:
    """``views`` symmetric copies of an NCHW batch, the identity first."""
    if views not in VIEW_COUNTS:
        raise ValueError(f"views must be one of {VIEW_COUNTS}, got {views}")
    for k in range(4 if views >= 4 else 1):
        rotated = torch.rot90(images, k, dims=(2, 3))
        yield rotated
        if views in (2, 8):
            yield rotated.flip(3)


def crop_offsets(source: int, size: int, crops: int) -> list[tuple[int, int]]:
    """(top, left) of the ordered crops of side ``size`` in a square of side ``source``: for 5 the corners
    (top-left, top-right, bottom-left, bottom-right) and the centre; for n² an n×n grid, row by row, evenly
    spaced from edge to edge (n = 1: the centre)."""
    slack = source - size
    centre = round(slack / 2)
    if crops == FIVE_CROPS:
        return [(0, 0), (0, slack), (slack, 0), (slack, slack), (centre, centre)]
    n = math.isqrt(crops)
    if n * n != crops:
        raise ValueError(f"crops must be {FIVE_CROPS} or a square number, got {crops}")
    steps = [centre] if n == 1 else [round(slack * i / (n - 1)) for i in range(n)]
    return [(top, left) for top in steps for left in steps]


def scaled_crops(images: torch.Tensor, scale: float, crops: int) -> Iterator[torch.Tensor]:
    """The ordered crops, of the input's own size, of an NCHW batch resized by ``scale`` (bilinear,
    antialiased); scale 1 yields the batch itself."""
    if scale == 1:
        yield images
        return
    height, width = images.shape[-2:]
    if height != width:
        raise ValueError(f"crops need square images, got {height}x{width}")
    source = round(scale * height)
    resized = TF.resize(images, [source, source], interpolation=InterpolationMode.BILINEAR, antialias=True)
    for top, left in crop_offsets(source, height, crops):
        yield resized[..., top : top + height, left : left + width]


@dataclass(frozen=True)
class ViewPlan:
    """Which views of each image test-time augmentation averages; the default is the image alone."""

    flips: int = 1  # dihedral views: 1, 2, 4 or 8
    crops: int = 1  # ordered crops per scale above 1: 5 or a square number
    scales: tuple[float, ...] = (1.0,)  # each >= 1; 1 = the image as it is

    @property
    def count(self) -> int:
        return self.flips * sum(1 if scale == 1 else self.crops for scale in self.scales)

    def views(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """Every view of an NCHW batch, the image itself first when scale 1 comes first."""
        for scale in self.scales:
            for crop in scaled_crops(images, scale, self.crops):
                yield from dihedral_views(crop, self.flips)

    def to_dict(self) -> dict:
        """What ``metrics.json`` and ``predict.json`` record."""
        return {"views": self.count, "flips": self.flips, "crops": self.crops, "scales": list(self.scales)}


def view_plan(tta: bool, views: int, crops: int = 1, scales: Sequence[float] = (1.0,)) -> ViewPlan:
    """The views for the ``tta``/``tta_views`` (flips and rotations), ``tta_crops`` and ``tta_scales``
    settings of evaluate and predict; crops and scales apply with or without ``tta``. The one check of these
    settings: :mod:`skinlesion.settings` calls it before anything is written."""
    if int(views) not in VIEW_COUNTS[1:]:
        raise ConfigError(f"tta_views={views} is not allowed: it must be 2, 4 or 8 (the flips/rotations of tta=true)")
    scales = tuple(float(s) for s in scales)
    if not scales or any(s < 1 for s in scales) or len(set(scales)) < len(scales):
        shown = "[" + ",".join(f"{s:g}" for s in scales) + "]"
        raise ConfigError(f"tta_scales={shown} is not allowed: give distinct factors >= 1, e.g. [1.0,1.25]")
    if crops != FIVE_CROPS and (crops < 1 or math.isqrt(crops) ** 2 != crops):
        raise ConfigError(
            f"tta_crops={crops} is not allowed: it must be 1, 5 (corners + centre) or a square number (4, 9, 16...)"
        )
    if crops > 1 and all(s == 1 for s in scales):
        raise ConfigError(
            f"tta_crops={crops} crops an enlarged image, but tta_scales={list(scales)} has no scale above 1; "
            "add one, e.g. tta_scales=[1.0,1.25]"
        )
    return ViewPlan(int(views) if tta else 1, int(crops), scales)


@torch.no_grad()
def predict_proba_tta(
    model: SkinLesionClassifier,
    images: torch.Tensor,
    views: ViewPlan | int = 8,
    calibrated: bool = True,
    metadata: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean class probabilities over the views of uint8 NCHW ``images`` (an int: that many flips/rotations;
    1 or ``ViewPlan()``: no TTA); each view with the images' ``metadata`` (a metadata model's; None: all
    missing)."""
    plan = views if isinstance(views, ViewPlan) else ViewPlan(flips=views)
    probs = [model.predict_proba(view, calibrated, metadata) for view in plan.views(images)]
    return torch.stack(probs).mean(dim=0)
