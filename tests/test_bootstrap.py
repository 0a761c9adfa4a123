"""Lesion-bootstrap intervals: same scores as torchmetrics on the full sample, wider when photos repeat a
lesion, reproducible, and a paired comparison that sees a real improvement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from skinlesion.inference.predictions import SplitPredictions
from skinlesion.labels import CLASSES
from skinlesion.models.metrics import probability_metrics
from skinlesion.scoring.artifacts import write_split_artifacts
from skinlesion.scoring.bootstrap import (
    Resamples,
    confidence_intervals,
    paired_difference,
    recall_per_class,
    scores_from_confusions,
)
from skinlesion.scoring.paired import PairedReference

K = len(CLASSES)


def noisy_predictions(labels: np.ndarray, error_rate: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wrong = rng.random(len(labels)) < error_rate
    return np.where(wrong, rng.integers(0, K, len(labels)), labels)


@pytest.mark.parametrize("absent", [None, "true", "true_and_predicted"])
def test_the_full_sample_scores_like_torchmetrics(absent: str | None) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, K, 300)
    probs = torch.tensor(rng.random((300, K))).softmax(1).float()
    if absent:  # class 3 is never true: balanced accuracy leaves it out; macro F1 counts it if predicted
        labels[labels == 3] = 0
    if absent == "true_and_predicted":
        probs[:, 3] = 0.0
    preds = probs.argmax(1).numpy()
    groups = [f"lesion_{i}" for i in range(300)]
    full = Resamples(np.ones((1, 300)), Resamples.draw(groups, n_resamples=1).lesion_of_image)
    ours = {k: float(v[0]) for k, v in scores_from_confusions(full.confusions(labels, preds, K)).items()}
    theirs = probability_metrics(probs, torch.tensor(labels), "test", CLASSES)
    assert ours == pytest.approx({k: theirs[f"test/{k}"] for k in ours}, abs=1e-6)


def test_intervals_bracket_the_score_and_widen_when_photos_repeat_a_lesion() -> None:
    labels = np.repeat(np.arange(K), 30)  # 210 lesions
    preds = noisy_predictions(labels, 0.4, seed=2)
    lesions = np.arange(len(labels))
    alone = confidence_intervals(labels, preds, lesions, CLASSES)
    # Four identical photos of every lesion: the same evidence, so the same interval when grouped by
    # lesion, and a falsely narrow one when every photo counts as independent.
    labels4, preds4 = np.repeat(labels, 4), np.repeat(preds, 4)
    grouped = confidence_intervals(labels4, preds4, np.repeat(lesions, 4), CLASSES)
    by_image = confidence_intervals(labels4, preds4, np.arange(len(labels4)), CLASSES)
    full = Resamples(np.ones((1, 210)), lesions).confusions(labels, preds, K)
    observed = {name: values[0] for name, values in scores_from_confusions(full).items()}
    observed |= {f"recall_{c}": r for c, r in zip(CLASSES, recall_per_class(full)[0], strict=True)}
    assert set(grouped) == set(observed)  # acc, balanced_acc, f1_macro and the recall of every class
    for name, (low, high) in grouped.items():
        assert low < observed[name] < high, name
        assert (low, high) == pytest.approx(alone[name], abs=0.03)
        by_image_width = by_image[name][1] - by_image[name][0]
        assert high - low > 1.6 * by_image_width  # about sqrt(4) = 2 times wider
    assert confidence_intervals(labels4, preds4, np.repeat(lesions, 4), CLASSES) == grouped  # fixed seed


def test_recall_of_a_rare_class_uses_the_resamples_that_hold_it_and_an_absent_class_has_none() -> None:
    labels = np.array([0] * 60 + [1] * 60 + [3] * 2)  # df: two lesions, missing from about 1 resample in 7
    preds = labels.copy()
    preds[-1] = 0  # one of the two df lesions missed
    intervals = confidence_intervals(labels, preds, np.arange(len(labels)), CLASSES)
    assert intervals["recall_df"] == (0.0, 1.0)  # 0, 1/2 or 1 of the drawn df lesions found
    assert intervals["recall_akiec"] == (1.0, 1.0)
    assert not {"recall_bkl", "recall_mel", "recall_nv", "recall_vasc"} & set(intervals)


def test_paired_difference_sees_a_real_improvement_and_none_between_equals() -> None:
    labels = np.repeat(np.arange(K), 40)
    weaker = noisy_predictions(labels, 0.5, seed=3)
    stronger = weaker.copy()
    wrong = np.flatnonzero(weaker != labels)
    stronger[wrong[: len(wrong) // 3]] = labels[wrong[: len(wrong) // 3]]  # fix a third of the mistakes
    groups = np.arange(len(labels)) // 2
    resamples = Resamples.draw(groups)
    better = paired_difference(labels, stronger, weaker, resamples, K)
    assert better["difference"] > 0 and better["low"] > 0 and better["p_a_better"] > 0.99
    same = paired_difference(labels, weaker, weaker, resamples, K)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0, "p_a_better": 0.5}  # ties count half
    # Two lesions apart: B fixes one mistake of A. B never loses a resample, and ties do not count against it.
    one_fix = weaker.copy()
    one_fix[wrong[0]] = labels[wrong[0]]
    close = paired_difference(labels, one_fix, weaker, resamples, K)
    assert close["low"] >= 0 and close["p_a_better"] > 0.5
    with pytest.raises(ValueError, match="empty split"):
        Resamples.draw([])


def test_balanced_accuracy_of_artifacts_and_bootstrap_leaves_out_a_class_that_is_only_predicted(tmp_path: Path) -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])  # classes 3-6 are never true; class 4 is predicted
    preds = np.array([0, 0, 0, 4, 1, 1, 4, 2, 0, 4])
    expected = balanced_accuracy_score(labels, preds)  # 7/12; counting class 4 as recall 0 gives 7/16
    probs = torch.nn.functional.one_hot(torch.tensor(preds), K).float() * 0.9 + 0.1 / K
    lesions = [f"lesion_{i // 2}" for i in range(len(labels))]
    ids = [f"image_{i}" for i in range(len(labels))]
    records = pd.DataFrame({"image_id": ids, "lesion_id": lesions})
    predictions = SplitPredictions(probs, torch.tensor(labels), torch.arange(len(labels)))
    metrics = write_split_artifacts(tmp_path, "test", predictions, records, CLASSES)
    assert metrics["test/balanced_acc"] == pytest.approx(expected, abs=1e-6)
    resamples = Resamples.draw(lesions, n_resamples=200)
    full = Resamples(np.ones((1, 5), np.float32), resamples.lesion_of_image)
    assert scores_from_confusions(full.confusions(labels, preds, K))["balanced_acc"][0] == pytest.approx(expected)
    versus_perfect = paired_difference(labels, preds, labels, resamples, K)
    assert versus_perfect["difference"] == pytest.approx(expected - 1.0)


def predictions_csv(preds: np.ndarray, labels: np.ndarray, order: np.ndarray) -> pd.DataFrame:
    """A two-class predictions CSV of images 0..N-1 (two photos per lesion), rows in ``order``."""
    frame = pd.DataFrame(
        {
            "image_id": [f"ISIC_{i}" for i in range(len(labels))],
            "lesion_id": [f"HAM_{i // 2}" for i in range(len(labels))],
            "true": np.where(labels == 1, "b", "a"),
            "prob_a": np.where(preds == 0, 0.9, 0.1),
            "prob_b": np.where(preds == 1, 0.9, 0.1),
            "pred": np.where(preds == 1, "b", "a"),
        }
    )
    return frame.iloc[order].reset_index(drop=True)


def test_a_pairing_scores_the_other_run_on_the_references_images_in_either_order() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    weak, strong = (np.where(rng.random(60) < error, 1 - labels, labels) for error in (0.4, 0.1))
    pairing = PairedReference.of(predictions_csv(weak, labels, np.arange(60)))
    other = predictions_csv(strong, labels, rng.permutation(60))  # the same images in another order
    forward = pairing.difference(other, "balanced_acc", reference_first=True)
    backward = pairing.difference(other, "balanced_acc", reference_first=False)
    expected = balanced_accuracy_score(labels, weak) - balanced_accuracy_score(labels, strong)
    assert forward["difference"] == pytest.approx(expected) == pytest.approx(-backward["difference"])
    assert (forward["low"], forward["high"]) == pytest.approx((-backward["high"], -backward["low"]))
    assert forward["p_a_better"] == pytest.approx(1 - backward["p_a_better"])
    fewer = other.iloc[1:]
    renamed = other.rename(columns={"prob_b": "prob_c"}).replace({"b": "c"})
    assert pairing.difference(fewer, "balanced_acc", reference_first=True) is None
    assert pairing.difference(renamed, "balanced_acc", reference_first=True) is None
