"""Test-time augmentation: average the probabilities over flips and 90-degree rotations.

Lesions have no orientation, so the eight symmetries of the square (the dihedral group D4) are all
plausible views of the same lesion; ``views=4`` uses the rotations only, ``views=2`` identity + flip.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from skinlesion.errors import ConfigError
from skinlesion.models.module import SkinLesionClassifier

VIEW_COUNTS = (1, 2, 4, 8)


def dihedral_views(images: torch.Tensor, views: int = 8) -> Iterator[torch.Tensor]:
    """``views`` symmetric copies of an NCHW batch, the identity first."""
    if views not in VIEW_COUNTS:
        raise ValueError(f"views must be one of {VIEW_COUNTS}, got {views}")
    for k in range(4 if views >= 4 else 1):
        rotated = torch.rot90(images, k, dims=(2, 3))
        yield rotated
        if views in (2, 8):
            yield rotated.flip(3)


def tta_views(tta: bool, views: int) -> int:
    """The number of views for the ``tta``/``tta_views`` settings of evaluate and predict (1 = no TTA)."""
    if not tta:
        return 1
    if int(views) not in VIEW_COUNTS[1:]:
        raise ConfigError(f"tta_views={views} is not valid; choose one of {', '.join(map(str, VIEW_COUNTS[1:]))}")
    return int(views)


@torch.no_grad()
def predict_proba_tta(
    model: SkinLesionClassifier,
    images: torch.Tensor,
    views: int = 8,
    calibrated: bool = True,
    metadata: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean class probabilities over the views of uint8 NCHW ``images`` (views=1: no TTA); each view with the
    images' ``metadata`` (a metadata model's; None: all missing)."""
    probs = [model.predict_proba(view, calibrated, metadata) for view in dihedral_views(images, views)]
    return torch.stack(probs).mean(dim=0)
