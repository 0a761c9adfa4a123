"""Melanoma and malignancy operating points: the most sensitive threshold that reaches a specificity on
validation, applied unchanged to test, on constructed scores whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from skinlesion.clinical.operating_points import (
    binary_curves,
    binary_score,
    operating_points,
    positive_flag,
    sensitivity_specificity,
    threshold_for_specificity,
)
from skinlesion.labels import CLASS_TO_INDEX, CLASSES

# Validation: 20 benign scores 0.01 ... 0.20 and 5 positives. At most 2 of 20 benign flagged (90%
# specificity): the lowest such threshold is 0.185 (0.19 and 0.20 above it), which finds 4 of 5 positives;
# at most 1 (95%): 0.195, which finds 3 of 5.
VAL_NEGATIVE = np.arange(1, 21) / 100
VAL_POSITIVE = np.array([0.15, 0.185, 0.195, 0.5, 0.9])
# Test: at 0.185, 3 of 10 benign flagged (specificity 0.7, not the 0.9 chosen for) and 2 of 4 positives
# found; at 0.195, 2 of 10 (0.8) and 1 of 4.
TEST_NEGATIVE = np.array([0.01, 0.05, 0.1, 0.12, 0.15, 0.17, 0.18, 0.19, 0.3, 0.6])
TEST_POSITIVE = np.array([0.1, 0.18, 0.186, 0.7])


def as_probs(negative: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Melanomas with p(mel) = score and naevi with p(mel) = score; the rest of the mass on nv."""
    scores = np.r_[negative, positive]
    probs = np.zeros((len(scores), len(CLASSES)))
    probs[:, CLASS_TO_INDEX["mel"]] = scores
    probs[:, CLASS_TO_INDEX["nv"]] = 1 - scores
    labels = np.r_[np.full(len(negative), CLASS_TO_INDEX["nv"]), np.full(len(positive), CLASS_TO_INDEX["mel"])]
    return probs, labels


def test_the_most_sensitive_threshold_that_reaches_the_specificity_on_a_constructed_score() -> None:
    score = np.r_[VAL_NEGATIVE, VAL_POSITIVE]
    positive = np.r_[np.zeros(20, bool), np.ones(5, bool)]
    assert threshold_for_specificity(score, positive, 0.90) == 0.185
    assert threshold_for_specificity(score, positive, 0.95) == 0.195
    assert sensitivity_specificity(score, positive, 0.185) == {
        "sensitivity": 0.8,
        "specificity": 0.9,
        "n_positive": 5,
        "n_negative": 20,
    }
    assert threshold_for_specificity(score, positive, 1.0) == 0.5  # the lowest score above every benign one
    with pytest.raises(ValueError, match="both positive and negative"):
        threshold_for_specificity(score, np.ones(25, bool), 0.9)


def test_thresholds_chosen_on_validation_are_applied_unchanged_to_test() -> None:
    val_probs, val_labels = as_probs(VAL_NEGATIVE, VAL_POSITIVE)
    test_probs, test_labels = as_probs(TEST_NEGATIVE, TEST_POSITIVE)
    result = operating_points(val_probs, val_labels, test_probs, test_labels, np.arange(14), n_resamples=300)
    assert set(result) == {"melanoma", "malignant"}
    melanoma = result["melanoma"]
    # AUROC: the benign scores below each positive, a tie counting half: 2.5 + 6.5 + 7 + 10 of 40 pairs.
    assert melanoma["auroc"] == pytest.approx(26 / 40)
    assert melanoma["auroc_low"] < melanoma["auroc"] < melanoma["auroc_high"]
    at_90, at_95 = melanoma["points"]
    assert at_90["threshold"] == 0.185 and at_95["threshold"] == 0.195
    assert (at_90["val_sensitivity"], at_90["val_specificity"]) == (0.8, 0.9)
    assert (at_90["test_sensitivity"], at_90["test_specificity"]) == (0.5, 0.7)
    assert (at_95["test_sensitivity"], at_95["test_specificity"]) == (0.25, 0.8)
    assert at_90["test_sensitivity_low"] <= 0.5 <= at_90["test_sensitivity_high"]
    assert at_90["test_specificity_low"] <= 0.7 <= at_90["test_specificity_high"]
    assert (at_90["test_n_positive"], at_90["test_n_negative"]) == (4, 10)
    assert result["malignant"]["points"] == melanoma["points"]  # no bcc or akiec mass: the same score


def test_the_malignant_score_sums_melanoma_bcc_and_akiec_and_the_flag_uses_it() -> None:
    probs = np.zeros((2, len(CLASSES)))
    probs[0, [CLASS_TO_INDEX[c] for c in ("mel", "bcc", "akiec", "nv")]] = [0.2, 0.2, 0.15, 0.45]
    probs[1, CLASS_TO_INDEX["nv"]] = 1.0
    assert binary_score(probs, "malignant") == pytest.approx([0.55, 0.0])
    assert positive_flag(probs, 0.5, "malignant").tolist() == [True, False]
    assert positive_flag(probs, 0.5, "melanoma").tolist() == [False, False]
    with pytest.raises(ValueError, match="unknown binary task"):
        binary_score(probs, "benign")


def test_curves_end_at_the_corners_and_carry_auroc_and_average_precision() -> None:
    score, positive = np.r_[TEST_NEGATIVE, TEST_POSITIVE], np.r_[np.zeros(10, bool), np.ones(4, bool)]
    curves = binary_curves(score, positive)
    assert (curves["fpr"][-1], curves["tpr"][-1]) == (1.0, 1.0)
    assert curves["recall"][0] == 1.0 and curves["precision"][-1] == 1.0
    assert curves["auroc"] == pytest.approx(26 / 40)
    assert curves["average_precision"] == pytest.approx(average_precision_score(positive, score))
