"""Operating points of the two binary questions a clinic asks: is it a melanoma, is it malignant?

A binary task's score is the summed probability of its positive classes (:data:`BINARY_TASKS`; malignant
is mel, bcc and akiec). Its ROC and precision-recall curves and AUROC describe the whole trade-off; a
clinic uses one threshold. The threshold for a target specificity is chosen on validation, as the lowest
one (the most sensitive) whose validation specificity reaches the target, and then applied unchanged to
test: the test sensitivity is what a clinic would get, and the test specificity is reported too because
it will not exactly equal the target. Choosing the threshold on test would overstate both.

An image is flagged when its score is at least the threshold (scikit-learn's ``roc_curve`` convention).
Intervals resample lesions (:mod:`skinlesion.scoring.bootstrap`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from skinlesion.clinical.auroc import image_weights, weighted_auroc
from skinlesion.labels import CLASSES
from skinlesion.scoring.bootstrap import LEVEL, N_RESAMPLES, SEED, Resamples, percentile_interval, recall_per_class

BINARY_TASKS: dict[str, tuple[str, ...]] = {"melanoma": ("mel",), "malignant": ("mel", "bcc", "akiec")}
TARGET_SPECIFICITIES = (0.90, 0.95)


def _positive_columns(task: str, classes: Sequence[str]) -> list[int]:
    if task not in BINARY_TASKS:
        raise ValueError(f"unknown binary task '{task}'; choose one of {', '.join(BINARY_TASKS)}")
    return [list(classes).index(name) for name in BINARY_TASKS[task]]


def binary_score(probs: np.ndarray, task: str = "malignant", classes: Sequence[str] = CLASSES) -> np.ndarray:
    """Summed probability of the task's positive classes, per image."""
    return np.asarray(probs, dtype=np.float64)[:, _positive_columns(task, classes)].sum(axis=1)


def binary_truth(labels: np.ndarray, task: str = "malignant", classes: Sequence[str] = CLASSES) -> np.ndarray:
    """Whether each image's true class is one of the task's positives."""
    return np.isin(np.asarray(labels), _positive_columns(task, classes))


def positive_flag(
    probs: np.ndarray, threshold: float, task: str = "malignant", classes: Sequence[str] = CLASSES
) -> np.ndarray:
    """The flag `predict` outputs: the task's score at or above a threshold chosen on validation."""
    return binary_score(probs, task, classes) >= threshold


def binary_curves(score: np.ndarray, positive: np.ndarray) -> dict[str, np.ndarray | float]:
    """ROC (``fpr``, ``tpr``, ``roc_thresholds``) and precision-recall (``precision``, ``recall``,
    ``pr_thresholds``) curves, ``auroc`` and ``average_precision``, for plotting and the model card."""
    fpr, tpr, roc_thresholds = roc_curve(positive, score)
    precision, recall, pr_thresholds = precision_recall_curve(positive, score)
    return {
        "fpr": fpr,
        "tpr": tpr,
        "roc_thresholds": roc_thresholds,
        "precision": precision,
        "recall": recall,
        "pr_thresholds": pr_thresholds,
        "auroc": float(roc_auc_score(positive, score)),
        "average_precision": float(average_precision_score(positive, score)),
    }


def threshold_for_specificity(score: np.ndarray, positive: np.ndarray, specificity: float) -> float:
    """The lowest threshold whose specificity on these (validation) images reaches ``specificity``: the
    most sensitive one that meets the target. ``inf`` (flag nothing) when only that does."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        raise ValueError("choosing a threshold needs both positive and negative images")
    fpr, _, thresholds = roc_curve(positive, score, drop_intermediate=False)
    meets = 1.0 - fpr >= specificity - 1e-12  # fpr only grows as the threshold falls: a prefix
    return float(thresholds[np.flatnonzero(meets)[-1]])


def sensitivity_specificity(score: np.ndarray, positive: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity and specificity of flagging ``score >= threshold``, with the counts behind them."""
    positive = np.asarray(positive, dtype=bool)
    flagged = np.asarray(score) >= threshold
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return {
        "sensitivity": float((flagged & positive).sum() / n_pos) if n_pos else float("nan"),
        "specificity": float((~flagged & ~positive).sum() / n_neg) if n_neg else float("nan"),
        "n_positive": n_pos,
        "n_negative": n_neg,
    }


def operating_points(
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    test_probs: np.ndarray,
    test_labels: np.ndarray,
    test_lesion_ids: Sequence,
    classes: Sequence[str] = CLASSES,
    tasks: Sequence[str] = tuple(BINARY_TASKS),
    specificities: Sequence[float] = TARGET_SPECIFICITIES,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict[str, dict]:
    """Per task: test ``auroc`` with its lesion-bootstrap interval (``auroc_low/high``), test
    ``average_precision``, and ``points``, one dict per target specificity: the ``threshold`` chosen on
    validation, the validation sensitivity and specificity it gives, and the test ones (with intervals)
    when it is applied unchanged."""
    resamples = Resamples.draw(test_lesion_ids, n_resamples=n_resamples, seed=seed)
    weights = image_weights(resamples)
    out = {}
    for task in tasks:
        val_score, val_positive = binary_score(val_probs, task, classes), binary_truth(val_labels, task, classes)
        score, positive = binary_score(test_probs, task, classes), binary_truth(test_labels, task, classes)
        low, high = percentile_interval(weighted_auroc(score, positive, weights), level)
        result = {
            "auroc": float(roc_auc_score(positive, score)),
            "auroc_low": low,
            "auroc_high": high,
            "average_precision": float(average_precision_score(positive, score)),
            "points": [],
        }
        for target in specificities:
            threshold = threshold_for_specificity(val_score, val_positive, target)
            val = sensitivity_specificity(val_score, val_positive, threshold)
            test = sensitivity_specificity(score, positive, threshold)
            # Binary confusions of each resample: recall of class 0 is specificity, of class 1 sensitivity.
            recalls = recall_per_class(resamples.confusions(positive.astype(int), (score >= threshold).astype(int), 2))
            sens_low, sens_high = percentile_interval(recalls[:, 1], level)
            spec_low, spec_high = percentile_interval(recalls[:, 0], level)
            result["points"].append(
                {
                    "target_specificity": float(target),
                    "threshold": threshold,
                    "val_sensitivity": val["sensitivity"],
                    "val_specificity": val["specificity"],
                    "test_sensitivity": test["sensitivity"],
                    "test_sensitivity_low": sens_low,
                    "test_sensitivity_high": sens_high,
                    "test_specificity": test["specificity"],
                    "test_specificity_low": spec_low,
                    "test_specificity_high": spec_high,
                    "test_n_positive": test["n_positive"],
                    "test_n_negative": test["n_negative"],
                }
            )
        out[task] = result
    return out
