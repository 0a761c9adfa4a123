"""Confidence intervals for the top-1 metrics that resample lesions, not images.

HAM10000 holds several photos of many lesions, and photos of one lesion are not independent: an
image-level bootstrap would give intervals that are too narrow. Each resample draws the split's lesions
with replacement (every photo of a drawn lesion comes along), so the interval says how much a score
would move on another test set of the same size. One set of resamples scores two models in a paired
comparison, which is what decides whether one backbone is really better than another on the same images.

The metrics follow :mod:`skinlesion.models.metrics` (balanced accuracy averages the recall of the classes
with true images, as scikit-learn does; macro F1 counts a class when it is true or predicted), so the
score of the full sample equals the one in ``metrics.json``. A resample without any image of a rare class
averages the recall of the classes it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_METRICS = ("acc", "balanced_acc", "f1_macro")
N_RESAMPLES = 1000
LEVEL = 0.95
SEED = 0


@dataclass(frozen=True)
class Resamples:
    """How often each lesion appears in each resample: (resamples, lesions), plus each image's lesion."""

    weights: np.ndarray
    lesion_of_image: np.ndarray

    @classmethod
    def draw(cls, groups: Sequence, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Resamples:
        _, lesion_of_image = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
        n_lesions = int(lesion_of_image.max()) + 1 if len(lesion_of_image) else 0
        if n_lesions == 0:
            raise ValueError("cannot bootstrap an empty split")
        rng = np.random.default_rng(seed)
        weights = rng.multinomial(n_lesions, np.full(n_lesions, 1.0 / n_lesions), size=n_resamples)
        return cls(weights.astype(np.float32), lesion_of_image)  # exact counts up to 2**24; 40 MB at 10k lesions

    def confusions(self, labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
        """(resamples, true, predicted) counts."""
        per_lesion = np.zeros((self.weights.shape[1], n_classes * n_classes), np.float32)
        np.add.at(per_lesion, (self.lesion_of_image, np.asarray(labels) * n_classes + np.asarray(preds)), 1.0)
        return (self.weights @ per_lesion).reshape(-1, n_classes, n_classes)


def scores_from_confusions(confusions: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy (mean recall) and macro F1 of each (true, predicted) count matrix."""
    true_positives = np.diagonal(confusions, axis1=1, axis2=2)
    support = confusions.sum(axis=2)
    predicted = confusions.sum(axis=1)
    present = support > 0  # balanced accuracy: the classes with a true image
    counted = (support + predicted) > 0  # macro F1: a class with no true and no predicted image is left out
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(present, true_positives / support, 0.0)
        f1 = np.where(counted, 2 * true_positives / (support + predicted), 0.0)
    return {
        "acc": true_positives.sum(axis=1) / confusions.sum(axis=(1, 2)),
        "balanced_acc": recall.sum(axis=1) / present.sum(axis=1),
        "f1_macro": f1.sum(axis=1) / counted.sum(axis=1),
    }


def interval_method(lesion_known: Sequence[bool]) -> dict[str, str]:
    """What a split's intervals resample, and why (``metrics.json``'s ``interval_method``): its lesions, or
    its images where the dataset names no lesions (ISIC 2018 Validation/Test without lesion groupings),
    where the intervals come out too narrow for photos of one lesion."""
    known = np.asarray(lesion_known, dtype=bool)
    unknown = int((~known).sum())
    if unknown == 0:
        return {"resampled": "lesion", "reason": "every image has its lesion id from the dataset"}
    if unknown == len(known):
        reason = f"the dataset has no lesion groupings, so each of the {unknown} images counts as its own lesion"
        return {"resampled": "image", "reason": reason}
    reason = f"{unknown} of {len(known)} images have no lesion id in the dataset and count as their own lesion"
    return {"resampled": "lesion", "reason": reason}


def recall_per_class(confusions: np.ndarray) -> np.ndarray:
    """(resamples, classes) recall; NaN where a resample holds no image of the class."""
    support = confusions.sum(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(support > 0, np.diagonal(confusions, axis1=1, axis2=2) / support, np.nan)


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of resampled values, ignoring NaN (a resample without the
    images a score needs); NaN, NaN when no resample has a value."""
    values = np.asarray(values, dtype=float)
    if np.isnan(values).all():
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def confidence_intervals(
    labels: np.ndarray, preds: np.ndarray, groups: Sequence, classes: Sequence[str], level: float = LEVEL, **draw
) -> dict[str, tuple[float, float]]:
    """Percentile interval of each metric in :data:`BOOTSTRAP_METRICS`, and of each class's recall
    (``recall_<class>``: melanoma sensitivity, say), over lesion resamples."""
    confusions = Resamples.draw(groups, **draw).confusions(labels, preds, len(classes))
    intervals = {
        name: percentile_interval(values, level) for name, values in scores_from_confusions(confusions).items()
    }
    recalls = recall_per_class(confusions)
    for k, name in enumerate(classes):
        if not np.isnan(recalls[:, k]).all():  # a class absent from the split has no recall to bound
            intervals[f"recall_{name}"] = percentile_interval(recalls[:, k], level)
    return intervals


def paired_difference(
    labels: np.ndarray,
    preds_a: np.ndarray,
    preds_b: np.ndarray,
    resamples: Resamples,
    n_classes: int,
    metric: str = "balanced_acc",
    level: float = LEVEL,
) -> dict[str, float]:
    """Score of A minus score of B on the same images (one set of resamples for both): the difference, its
    interval, and how often A wins a resample (a tie counts half, so two equal models get 0.5)."""
    a = scores_from_confusions(resamples.confusions(labels, preds_a, n_classes))[metric]
    b = scores_from_confusions(resamples.confusions(labels, preds_b, n_classes))[metric]
    full = Resamples(np.ones((1, resamples.weights.shape[1]), np.float32), resamples.lesion_of_image)
    observed = (
        scores_from_confusions(full.confusions(labels, preds_a, n_classes))[metric][0]
        - scores_from_confusions(full.confusions(labels, preds_b, n_classes))[metric][0]
    )
    low, high = percentile_interval(a - b, level)
    wins = float(np.mean(a > b) + 0.5 * np.mean(a == b))
    return {"difference": float(observed), "low": low, "high": high, "p_a_better": wins}
