"""One explained image: what its figure shows and what its table row says.

The original is shrunk for display first and the heatmap is mapped onto those pixels, so figures of
large photos stay small; the row (true class, prediction, confidence, top 3) is the same for the
explanations of your images and for a split's galleries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from skinlesion.data.preprocessing import Preprocessing
from skinlesion.gradcam.maps import cam_on_image
from skinlesion.inference.topk import decision

DISPLAY_SIDE = 384  # longer side of the originals in figures


def for_display(image: np.ndarray, side: int = DISPLAY_SIDE) -> np.ndarray:
    scale = side / max(image.shape[:2])
    if scale >= 1:
        return image
    return cv2.resize(
        image, (round(image.shape[1] * scale), round(image.shape[0] * scale)), interpolation=cv2.INTER_AREA
    )


@dataclass
class Explanation:
    """One image for a figure: the (downscaled) original, its heatmap on those pixels, the probabilities."""

    name: str
    image: np.ndarray
    cam: np.ndarray
    probs: np.ndarray
    label: int | None = None

    @classmethod
    def build(
        cls,
        name: str,
        original: np.ndarray,
        cam: np.ndarray,
        probs: np.ndarray,
        pre: Preprocessing,
        center_crop: bool,
        label: int | None = None,
    ) -> Explanation:
        image = for_display(original)
        return cls(name, image, cam_on_image(cam, *image.shape[:2], pre, center_crop), np.asarray(probs), label)

    @property
    def pred(self) -> int:
        return int(self.probs.argmax())


def explanation_row(item: Explanation, classes: Sequence[str]) -> dict:
    """The table columns of one explained image."""
    row = {"true": classes[item.label] if item.label is not None else ""} | decision(item.probs, classes)
    row["confidence"] = round(row["confidence"], 4)
    return row
