"""One type for a model's predictions on a split, from the training loop to the sweep report.

Training (the module's evaluation epochs), ``evaluate`` (one model, TTA, an ensemble's average),
``explain`` and the report all hold the same thing: probabilities and labels of some records of a
DataModule, in record order, with the logits where the temperature is still to be fitted. The
predictions CSV (``predictions_<split>.csv``) is that type written out beside the records' ids, and
:meth:`SplitPredictions.from_frame` reads it back, so the report scores exactly what the run wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

PROB_PREFIX = "prob_"


def probabilities(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``softmax(logits / temperature)`` in float32: the calibrated probabilities of every tool."""
    return (logits.float() / temperature).softmax(dim=1)


@dataclass(frozen=True)
class SplitPredictions:
    """Class probabilities of the records ``indices`` (rows of a DataModule's records), with their labels."""

    probs: torch.Tensor  # N x classes
    labels: torch.Tensor  # N
    indices: torch.Tensor  # N rows of the records, ascending
    logits: torch.Tensor | None = None  # N x classes, when the temperature may still change

    @classmethod
    def from_logits(
        cls, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, temperature: float = 1.0
    ) -> SplitPredictions:
        return cls(probabilities(logits, temperature), labels, indices, logits)

    @classmethod
    def in_record_order(cls, probs: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> SplitPredictions:
        """Batches come in loader order; the records' order makes two models' predictions comparable row by row."""
        order = indices.argsort()
        return cls(probs[order], labels[order], indices[order])

    @classmethod
    def average(cls, members: Sequence[SplitPredictions], weights: Sequence[float]) -> SplitPredictions:
        """The ensemble of models that predicted the same records: the weighted mean of their probabilities
        (weights of any scale, normalised to sum 1; equal weights give the plain mean)."""
        first = members[0]
        stacked = torch.stack([m.probs for m in members])
        w = torch.tensor(weights, dtype=stacked.dtype)
        return cls((stacked * w[:, None, None]).sum(dim=0) / w.sum(), first.labels, first.indices)

    def with_temperature(self, temperature: float) -> SplitPredictions:
        if self.logits is None:
            raise ValueError("these predictions keep no logits, so no temperature can be applied")
        return SplitPredictions.from_logits(self.logits, self.labels, self.indices, temperature)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(dim=1).numpy()

    def records_of(self, records: pd.DataFrame) -> pd.DataFrame:
        """The rows of ``records`` these predictions are for, in their order."""
        return records.loc[self.indices.numpy()]

    def to_frame(self, records: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
        """The predictions CSV: image, lesion, whether the dataset named the lesion, true class, a probability
        per class and the predicted class."""
        rows = self.records_of(records)
        known = rows["lesion_known"] if "lesion_known" in rows else pd.Series(True, index=rows.index)
        frame = pd.DataFrame(
            {
                "image_id": rows["image_id"].to_numpy(),
                "lesion_id": rows["lesion_id"].to_numpy(),
                "lesion_known": known.to_numpy(),
                "true": [classes[i] for i in self.labels.numpy()],
            }
        )
        for k, name in enumerate(classes):
            frame[f"{PROB_PREFIX}{name}"] = self.probs[:, k].numpy()
        frame["pred"] = [classes[i] for i in self.preds]
        return frame

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> SplitPredictions:
        """A predictions CSV read back (rows numbered in the file's order); its classes are :func:`frame_classes`."""
        classes = frame_classes(frame)
        index = {name: k for k, name in enumerate(classes)}
        probs = torch.tensor(frame[[f"{PROB_PREFIX}{c}" for c in classes]].to_numpy(np.float32))
        labels = torch.tensor(frame["true"].map(index).to_numpy(np.int64))
        return cls(probs, labels, torch.arange(len(frame)))


def frame_classes(frame: pd.DataFrame) -> list[str]:
    """The classes of a predictions CSV, in its column order."""
    return [c.removeprefix(PROB_PREFIX) for c in frame.columns if c.startswith(PROB_PREFIX)]


def read_predictions(path: Path) -> pd.DataFrame | None:
    """A ``predictions_<split>.csv`` with its ids as text, or None where the run wrote none."""
    if not Path(path).is_file():
        return None
    return pd.read_csv(path, dtype={"image_id": str, "lesion_id": str}, keep_default_na=False)
