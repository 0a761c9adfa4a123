"""One-vs-rest AUROC of many lesion resamples at once.

scikit-learn's ``roc_auc_score(..., sample_weight=w)`` gives the same number for one weight vector (a test
checks it), but an interval needs it for every one of 1,000 resamples, for every class and every subgroup:
hundreds of thousands of calls. Here a resample is a row of a weight matrix (how often each image was
drawn, i.e. how often its lesion was) and all rows are scored in one pass over the sorted scores. AUROC is
the chance that a positive outranks a negative, a tie counting half (Mann-Whitney).
"""

from __future__ import annotations

import numpy as np

from skinlesion.scoring.bootstrap import Resamples


def image_weights(resamples: Resamples) -> np.ndarray:
    """(resamples, images): how often each image appears in each lesion resample."""
    return resamples.weights[:, resamples.lesion_of_image].astype(np.float64)


def weighted_auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(resamples,) AUROC of ``scores`` for the ``positive`` images under each row of ``weights``
    (resamples, images); NaN for a row that weighs no positive or no negative."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if scores.size == 0:
        return np.full(weights.shape[0], np.nan)
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    drawn = np.ascontiguousarray(weights.T[order])  # (images, resamples): the sums below run down columns
    pos = drawn * positive[order, None]
    neg = drawn - pos
    ties = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # first image of each distinct score
    if len(ties) < len(ranked):  # equal scores: one group each, so that a tie counts half
        pos, neg = np.add.reduceat(pos, ties, axis=0), np.add.reduceat(neg, ties, axis=0)
    neg_below = np.cumsum(neg, axis=0) - neg
    n_pos, n_neg = pos.sum(axis=0), neg.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (neg_below + 0.5 * neg)).sum(axis=0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def macro_auroc(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(resamples,) mean one-vs-rest AUROC over the classes a resample holds both as positive and negative.

    A class absent from a subgroup is left out rather than scored 0 (torchmetrics' ``MulticlassAUROC``
    averages an absent class as 0, which would make every subgroup without dermatofibromas look worse).
    """
    probs, labels = np.asarray(probs), np.asarray(labels)
    per_class = np.stack([weighted_auroc(probs[:, k], labels == k, weights) for k in range(probs.shape[1])], axis=1)
    counted = (~np.isnan(per_class)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counted > 0, np.nansum(per_class, axis=1) / counted, np.nan)
