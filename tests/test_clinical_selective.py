"""Selective prediction: the risk-coverage curve and its area on orderings worked out by hand, ties kept
together, and an abstention threshold chosen on validation and applied to test."""

from __future__ import annotations

import numpy as np
import pytest

from skinlesion.clinical.selective import (
    abstain,
    at_coverage,
    aurc,
    confidence_threshold,
    risk_coverage_curve,
    scores_when_kept,
    selective_summary,
)


def two_class(confidence: list[float], predicted: list[int]) -> np.ndarray:
    """Probabilities whose top class is ``predicted`` with probability ``confidence``."""
    probs = np.array([[c, 1 - c] if p == 0 else [1 - c, c] for c, p in zip(confidence, predicted, strict=True)])
    return probs


# Most confident first: right (class 0), wrong (a 1 called 0), right (class 1), wrong (a 0 called 1).
PROBS = two_class([0.9, 0.8, 0.7, 0.6], [0, 0, 1, 1])
LABELS = np.array([0, 1, 1, 0])


def test_risk_coverage_and_its_area_on_a_known_ordering() -> None:
    curve = risk_coverage_curve(PROBS, LABELS)
    assert curve["coverage"].tolist() == [0.25, 0.5, 0.75, 1.0]
    assert curve["threshold"].tolist() == [0.9, 0.8, 0.7, 0.6]
    assert curve["error"].tolist() == pytest.approx([0, 1 / 2, 1 / 3, 1 / 2])
    # balanced accuracy of the kept images: class 0 only (1); 0's recall 1, 1's 0 (1/2); 1 and 1/2 (3/4); 1/2, 1/2
    assert curve["balanced_error"].tolist() == pytest.approx([0, 1 / 2, 1 / 4, 1 / 2])
    assert aurc(curve) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert aurc(curve, "balanced_error") == pytest.approx((0 + 1 / 2 + 1 / 4 + 1 / 2) / 4)


def test_images_of_equal_confidence_are_kept_together() -> None:
    probs = two_class([0.9, 0.9, 0.5, 0.5], [0, 0, 0, 0])
    curve = risk_coverage_curve(probs, np.array([0, 1, 0, 0]))  # right, wrong | right, right
    assert curve["n_kept"].tolist() == [2, 4]
    assert curve["error"].tolist() == pytest.approx([1 / 2, 1 / 4])
    assert aurc(curve) == pytest.approx(0.5 * 1 / 2 + 0.5 * 1 / 4)


def test_balanced_accuracy_at_a_coverage_is_that_of_the_most_confident_share() -> None:
    summary = selective_summary(PROBS, LABELS, coverages=(0.5, 0.7))
    assert summary["balanced_acc_at_50"] == pytest.approx(1 / 2) and summary["coverage_at_50"] == 0.5
    assert summary["balanced_acc_at_70"] == pytest.approx(3 / 4) and summary["coverage_at_70"] == 0.75
    assert summary["acc_at_70"] == pytest.approx(2 / 3)
    assert summary["aurc"] == pytest.approx(1 / 3)
    assert at_coverage(risk_coverage_curve(PROBS, LABELS), 1.0)["n_kept"] == 4


def test_an_abstention_threshold_chosen_on_validation_is_applied_to_test() -> None:
    val = two_class([0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.52], [0] * 10)
    threshold = confidence_threshold(val, 0.8)
    assert threshold == 0.6  # the 8th most confident of 10 validation images
    assert (~abstain(val, threshold)).mean() == 0.8
    test = two_class([0.99, 0.7, 0.65, 0.59, 0.58], [0, 1, 0, 1, 0])
    assert abstain(test, threshold).tolist() == [False, False, False, True, True]
    # kept: class 0 right, a 0 called 1, class 0 right -> accuracy 2/3; only class 0 is true: recall 2/3
    kept = scores_when_kept(test, np.array([0, 0, 0, 1, 1]), threshold)
    assert kept == pytest.approx({"coverage": 3 / 5, "acc": 2 / 3, "balanced_acc": 2 / 3})
    assert confidence_threshold(val, 1.0) == 0.52 and confidence_threshold(val, 0.0) == 0.95
