"""Two predictions CSVs of the same images, paired: the lesion-bootstrap difference of a metric.

The sweep report (each configuration against rank 1 or a named baseline) and ``python -m skinlesion.bench
paired`` (any run or evaluate folder against a reference) pair this way: the other run's predictions put in
the reference's image order, and both scored on one set of resamples of the reference's lesions, so a
difference is measured on the same images and the same draws for every run compared with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from skinlesion.inference.predictions import SplitPredictions, frame_classes
from skinlesion.scoring.bootstrap import Resamples, paired_difference


@dataclass(frozen=True)
class PairedReference:
    """A reference's predictions CSV, scored, with the resamples every run paired with it shares."""

    frame: pd.DataFrame
    classes: list[str]
    labels: np.ndarray
    preds: np.ndarray
    resamples: Resamples

    @classmethod
    def of(cls, frame: pd.DataFrame) -> PairedReference:
        """Resampled by lesion (by image where the CSV names no lesions)."""
        scored = SplitPredictions.from_frame(frame)
        groups = frame["lesion_id"] if "lesion_id" in frame else frame["image_id"]
        return cls(frame, frame_classes(frame), scored.labels.numpy(), scored.preds, Resamples.draw(groups))

    def preds_of(self, other: pd.DataFrame) -> np.ndarray | None:
        """``other``'s predicted classes in the reference's image order; None unless it predicted exactly the
        reference's images with the same classes."""
        same_images = len(other) == len(self.frame) and set(other["image_id"]) == set(self.frame["image_id"])
        if frame_classes(other) != self.classes or not same_images:
            return None
        aligned = self.frame[["image_id", "true"]].merge(other.drop(columns="true"), on="image_id", how="left")
        return SplitPredictions.from_frame(aligned).preds

    def difference(self, other: pd.DataFrame, metric: str, *, reference_first: bool) -> dict[str, float] | None:
        """The reference's ``metric`` minus ``other``'s (``reference_first``) or the reverse, with its interval
        and ``p_a_better``, how often the first of the two wins a resample; None when not the same images."""
        preds = self.preds_of(other)
        if preds is None:
            return None
        first, second = (self.preds, preds) if reference_first else (preds, self.preds)
        return paired_difference(self.labels, first, second, self.resamples, len(self.classes), metric)
