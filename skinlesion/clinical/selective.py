"""Selective prediction: how good the model is on the images it is most sure of, and when to abstain.

The risk-coverage curve keeps the most confident images first and reports, for each share kept
(coverage), the risk on those kept: 1 - accuracy, or 1 - balanced accuracy (which the ISIC ranking uses,
and which plain accuracy hides when the kept images are mostly naevi). Confidence is the top-class
probability, so pass temperature-scaled probabilities: temperature does not change a prediction but does
change which images look most certain.

Images of equal confidence are kept or dropped together (a threshold cannot separate them), so the curve
has one point per distinct confidence. The area under it (AURC, Geifman et al. 2019) weighs each point by
the coverage it adds: without ties it is the mean over k of the risk of the k most confident images.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from skinlesion.scoring.bootstrap import scores_from_confusions

COVERAGES = (0.8, 0.9)


def _confusions(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """(images, true x predicted) one-hot counts, one row per image."""
    counts = np.zeros((len(labels), n_classes * n_classes))
    counts[np.arange(len(labels)), labels * n_classes + preds] = 1.0
    return counts


def risk_coverage_curve(probs: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """One row per distinct confidence, most confident first, for keeping every image at least that
    confident: ``threshold``, ``n_kept``, ``coverage``, ``acc``, ``balanced_acc``, ``error`` (1 - acc) and
    ``balanced_error`` (1 - balanced accuracy over the classes among the kept images)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    n, n_classes = probs.shape
    confidence = probs.max(axis=1)
    order = np.argsort(-confidence, kind="stable")
    ranked = confidence[order]
    last = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])  # last image of each tie group
    cumulative = np.cumsum(_confusions(labels[order], probs.argmax(axis=1)[order], n_classes), axis=0)
    scores = scores_from_confusions(cumulative[last].reshape(-1, n_classes, n_classes))
    return pd.DataFrame(
        {
            "threshold": ranked[last],
            "n_kept": last + 1,
            "coverage": (last + 1) / n,
            "acc": scores["acc"],
            "balanced_acc": scores["balanced_acc"],
            "error": 1 - scores["acc"],
            "balanced_error": 1 - scores["balanced_acc"],
        }
    )


def aurc(curve: pd.DataFrame, risk: str = "error") -> float:
    """Area under a risk-coverage curve: each point's risk times the coverage it adds."""
    added = np.diff(np.r_[0.0, curve["coverage"].to_numpy()])
    return float((added * curve[risk].to_numpy()).sum())


def at_coverage(curve: pd.DataFrame, coverage: float) -> dict[str, float]:
    """The curve's first point that keeps at least ``coverage`` of the images (ties can make it keep more)."""
    row = curve[curve["coverage"] >= coverage - 1e-12].iloc[0]
    return {name: float(value) for name, value in row.items()}


def confidence_threshold(probs: np.ndarray, coverage: float) -> float:
    """The confidence to abstain below so that at least ``coverage`` of these (validation) images are kept."""
    ranked = np.sort(np.asarray(probs, dtype=np.float64).max(axis=1))[::-1]
    k = int(np.clip(np.ceil(coverage * len(ranked) - 1e-9), 1, len(ranked)))
    return float(ranked[k - 1])


def abstain(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Whether `predict` should abstain on each image: its confidence is below the validation threshold."""
    return np.asarray(probs).max(axis=1) < threshold


def scores_when_kept(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """``coverage``, ``acc`` and ``balanced_acc`` on the images kept at a threshold chosen elsewhere (on
    validation): what a test set gets from it."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    kept = ~abstain(probs, threshold)
    n_classes = probs.shape[1]
    confusions = _confusions(labels[kept], probs[kept].argmax(axis=1), n_classes).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = scores_from_confusions(confusions.reshape(1, n_classes, n_classes))
    return {
        "coverage": float(kept.mean()),
        "acc": float(scores["acc"][0]),
        "balanced_acc": float(scores["balanced_acc"][0]),
    }


def selective_summary(
    probs: np.ndarray, labels: np.ndarray, coverages: tuple[float, ...] = COVERAGES
) -> dict[str, float]:
    """``aurc`` (risk 1 - accuracy), ``aurc_balanced`` (1 - balanced accuracy), and at each coverage c
    (in percent in the key): ``balanced_acc_at_<c>``, ``acc_at_<c>`` and the ``coverage_at_<c>`` reached."""
    curve = risk_coverage_curve(probs, labels)
    out = {"aurc": aurc(curve, "error"), "aurc_balanced": aurc(curve, "balanced_error")}
    for coverage in coverages:
        point, key = at_coverage(curve, coverage), round(100 * coverage)
        out |= {f"balanced_acc_at_{key}": point["balanced_acc"], f"acc_at_{key}": point["acc"]}
        out[f"coverage_at_{key}"] = point["coverage"]
    return out
