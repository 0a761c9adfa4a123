"""Conformal prediction sets: the APS/RAPS scores and the corrected quantile by hand, coverage of at least
1 - alpha over many exchangeable draws, smaller sets from a better classifier, and why one photo per
lesion is calibrated on."""

from __future__ import annotations

import numpy as np
import pytest

from skinlesion.clinical.conformal import (
    ConformalCalibration,
    calibrate_conformal,
    conformal_quantile,
    conformity_scores,
    image_sets,
    one_per_lesion,
    prediction_sets,
    set_coverage,
    set_labels,
)

K = 7


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def draw(rng: np.random.Generator, n: int, skill: float) -> tuple[np.ndarray, np.ndarray]:
    """Exchangeable images: a random class, whose logit is raised by ``skill`` over standard normal noise."""
    labels = rng.integers(0, K, n)
    return softmax(rng.normal(0, 1, (n, K)) + skill * np.eye(K)[labels]), labels


def test_aps_and_raps_scores_of_a_hand_computed_example() -> None:
    probs = np.array([[0.5, 0.3, 0.2]])  # ranked 0, 1, 2: mass up to and including each class
    assert conformity_scores(probs)[0] == pytest.approx([0.5, 0.8, 1.0])
    assert conformity_scores(probs, lam=0.1, k_reg=1)[0] == pytest.approx([0.5, 0.9, 1.2])  # + 0.1 (rank - 1)
    assert conformity_scores(probs, u=np.array([0.5]))[0] == pytest.approx([0.25, 0.65, 0.9])  # half of its own
    assert conformity_scores(np.array([[0.2, 0.5, 0.3]]))[0] == pytest.approx([1.0, 0.5, 0.8])  # any column order


def test_the_quantile_has_the_finite_sample_correction() -> None:
    scores = np.arange(1, 10) / 10  # n = 9
    assert conformal_quantile(scores, 0.1) == 0.9  # ceil(10 * 0.9) = 9th smallest
    assert conformal_quantile(scores, 0.2) == 0.8  # ceil(10 * 0.8) = 8th, not the 9th rounding would give
    assert conformal_quantile(scores[:4], 0.1) == np.inf  # ceil(5 * 0.9) = 5 > 4: every class


@pytest.mark.parametrize(("lam", "k_reg", "randomized"), [(0.0, 0, False), (0.05, 2, True)])
def test_coverage_is_at_least_one_minus_alpha_over_many_exchangeable_draws(
    lam: float, k_reg: int, randomized: bool
) -> None:
    rng = np.random.default_rng(0)
    alpha, n, draws = 0.1, 200, 300
    coverages = []
    for seed in range(draws):
        cal_probs, cal_labels = draw(rng, n, skill=1.5)
        test_probs, test_labels = draw(rng, n, skill=1.5)
        calibration = calibrate_conformal(
            cal_probs, cal_labels, alpha=alpha, lam=lam, k_reg=k_reg, randomized=randomized, seed=seed
        )
        sets = prediction_sets(test_probs, calibration, seed=seed + draws)
        coverages.append(set_coverage(sets, test_labels)["coverage"])
    mean, standard_error = np.mean(coverages), np.std(coverages) / np.sqrt(draws)
    assert mean >= 1 - alpha - 3 * standard_error
    assert mean <= 1 - alpha + 1 / (n + 1) + 0.02  # sets are not padded far beyond what is needed


def test_sets_shrink_as_the_classifier_improves() -> None:
    rng = np.random.default_rng(1)
    sizes = []
    for skill in (0.5, 2.0, 4.0):
        calibration = calibrate_conformal(*draw(rng, 2000, skill))
        test_probs, test_labels = draw(rng, 2000, skill)
        result = set_coverage(prediction_sets(test_probs, calibration), test_labels)
        assert result["coverage"] >= 0.88
        sizes.append(result["mean_set_size"])
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[0] > 4 and sizes[2] < 1.5


def test_without_randomisation_a_confident_classifier_gets_needlessly_large_sets() -> None:
    # Why sets are randomised by default: a right, confident image's true class scores its whole probability
    # (near 1), so the quantile lands near 1 and less certain images take in many classes.
    rng = np.random.default_rng(2)
    cal_probs, cal_labels = draw(rng, 2000, skill=4.0)
    test_probs, test_labels = draw(rng, 2000, skill=4.0)
    fixed, randomised = (
        set_coverage(prediction_sets(test_probs, calibrate_conformal(cal_probs, cal_labels, randomized=r)), test_labels)
        for r in (False, True)
    )
    assert fixed["coverage"] > 0.99 and fixed["mean_set_size"] > 2.5
    assert randomised["coverage"] == pytest.approx(0.9, abs=0.1) and randomised["mean_set_size"] < 1.5


def test_a_given_u_replaces_the_seeded_draw() -> None:
    calibration = ConformalCalibration(0.6, 0.1, 0.0, 0, True, 100, "image")
    probs = np.array([[0.5, 0.3, 0.2]] * 2)
    # u = 0: scores 0, 0.5, 0.8 (the mass above each class); u = 1: 0.5, 0.8, 1.0; kept up to 0.6
    sets = prediction_sets(probs, calibration, u=np.array([0.0, 1.0]))
    assert sets.tolist() == [[True, True, False], [True, False, False]]
    assert (prediction_sets(probs, calibration, seed=5) == prediction_sets(probs, calibration, seed=5)).all()


def test_an_image_s_randomised_set_follows_its_id_not_its_position() -> None:
    calibration = ConformalCalibration(0.6, 0.1, 0.0, 0, True, 100, "image")
    ids = [f"ISIC_{i:07d}" for i in range(64)]
    probs = np.tile([0.5, 0.3, 0.2], (64, 1))  # u decides between {0} and {0, 1} for each image
    sets = image_sets(probs, calibration, ids)
    assert 0 < sets[:, 1].sum() < 64
    assert (image_sets(probs[::-1], calibration, ids[::-1])[::-1] == sets).all()
    assert (image_sets(probs[:5], calibration, ids[:5]) == sets[:5]).all()  # alone or in a larger batch


def lesions(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """150 easy lesions with five near-identical photos each, and 150 hard lesions with one photo."""
    parts = []
    for offset, photos, skill, spread in ((0, 5, 1.0, 0.2), (1000, 1, -1.0, 1.5)):
        labels = rng.integers(0, K, 150)
        logits = np.repeat(rng.normal(0, spread, (150, K)) + skill * np.eye(K)[labels], photos, axis=0)
        probs = softmax(logits + rng.normal(0, 0.05, logits.shape))
        parts.append((probs, np.repeat(labels, photos), offset + np.repeat(np.arange(150), photos)))
    return tuple(np.concatenate(arrays) for arrays in zip(*parts, strict=True))


def test_one_photo_per_lesion_keeps_the_guarantee_for_lesions_that_calibrating_on_every_photo_loses() -> None:
    # Calibrated on every photo, the easy lesions' 750 photos outvote the 150 hard lesions: 90% of photos
    # are covered but only about 70% of lesions. One photo per lesion makes lesions the exchangeable unit.
    rng = np.random.default_rng(2)
    per_image, per_lesion = [], []
    for seed in range(10):
        cal_probs, cal_labels, cal_lesions = lesions(rng)
        test_probs, test_labels, test_lesions = lesions(rng)
        for lesion_ids, results in ((None, per_image), (cal_lesions, per_lesion)):
            calibration = calibrate_conformal(cal_probs, cal_labels, lesion_ids, seed=seed)
            sets = prediction_sets(test_probs, calibration)
            results.append(set_coverage(sets, test_labels, test_lesions))
    assert np.mean([r["coverage"] for r in per_image]) == pytest.approx(0.9, abs=0.02)
    assert np.mean([r["coverage_lesion"] for r in per_image]) < 0.8
    assert np.mean([r["coverage_lesion"] for r in per_lesion]) >= 0.88
    assert calibrate_conformal(cal_probs, cal_labels, cal_lesions).n_calibration == 300
    assert calibrate_conformal(cal_probs, cal_labels, cal_lesions).grouping == "one_per_lesion"


def test_one_photo_is_drawn_from_each_lesion_reproducibly() -> None:
    ids = np.array(["a", "a", "a", "b", "c", "c"])
    picked = one_per_lesion(ids, seed=3)
    assert sorted(ids[picked]) == ["a", "b", "c"]
    assert (one_per_lesion(ids, seed=3) == picked).all()
    assert len({tuple(one_per_lesion(ids, seed=s)) for s in range(20)}) > 1  # a random photo, not the first


def test_coverage_set_size_and_labels_of_hand_made_sets() -> None:
    sets = np.array([[True, True, False], [False, True, False], [True, False, True]])
    result = set_coverage(sets, np.array([1, 0, 2]), ["a", "a", "b"], classes=("x", "y", "z"))
    assert result == pytest.approx(
        {
            "coverage": 2 / 3,
            "coverage_lesion": (1 / 2 + 1) / 2,  # lesion a: one of its two photos covered; b: its one
            "mean_set_size": 5 / 3,
            "empty_sets": 0.0,
            "coverage_x": 0.0,
            "coverage_y": 1.0,
            "coverage_z": 1.0,
        }
    )
    assert set_labels(sets, ("x", "y", "z")) == ["x|y", "y", "x|z"]


def test_a_set_always_holds_the_top_class_unless_empty_sets_are_allowed() -> None:
    probs = np.array([[0.6, 0.3, 0.1]])
    fixed = {"alpha": 0.2, "randomized": False}
    calibration = calibrate_conformal(np.array([[0.9, 0.05, 0.05]] * 20), np.zeros(20, int), **fixed)
    assert calibration.qhat == pytest.approx(0.9)
    assert prediction_sets(probs, calibration).tolist() == [[True, True, False]]  # 0.6, 0.9 <= 0.9
    tight = calibrate_conformal(np.array([[0.5, 0.5, 0.0]] * 20), np.zeros(20, int), **fixed)
    assert prediction_sets(np.array([[0.8, 0.1, 0.1]]), tight, allow_empty=True).tolist() == [[False] * 3]
    assert prediction_sets(np.array([[0.8, 0.1, 0.1]]), tight).tolist() == [[True, False, False]]
    with pytest.raises(ValueError, match="alpha"):
        calibrate_conformal(probs, np.array([0]), alpha=1.5)
