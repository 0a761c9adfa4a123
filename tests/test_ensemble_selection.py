"""Greedy forward selection and stacking combine an ensemble's members from validation predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skinlesion.inference.predictions import SplitPredictions
from skinlesion.inference.selection import Stacker, cv_grouping, greedy_selection, plain_mean

LABELS = [0, 0, 1, 1]


def predictions(p_true: list[float], labels: list[int] = LABELS) -> SplitPredictions:
    """Two-class predictions giving each image's true class ``p_true``."""
    true = torch.tensor(p_true, dtype=torch.float32)
    first = torch.where(torch.tensor(labels) == 0, true, 1 - true)
    return SplitPredictions(torch.stack([first, 1 - first], 1), torch.tensor(labels), torch.arange(len(labels)))


# a: right on images 0-2 and confident, wrong on 3; b: right on 3, wrong on 2; c: always class 0, confidently.
MEMBERS = {
    "a": predictions([0.9, 0.9, 0.9, 0.4]),
    "b": predictions([0.6, 0.6, 0.45, 0.9]),
    "c": predictions([0.99, 0.99, 0.01, 0.01]),
}


def test_greedy_picks_the_best_member_then_the_one_that_fixes_its_errors() -> None:
    # Round 1: a and b both reach balanced accuracy 0.75, a with the lower NLL; round 2: a+b gets every image.
    chosen = greedy_selection(MEMBERS, rounds=2, metric="balanced_acc")
    assert chosen.weights == {"a": 0.5, "b": 0.5}
    record = chosen.to_dict()
    assert [step["added"] for step in record["path"]] == ["a", "b"]
    assert record["method"] == "greedy" and record["kept_rounds"] == 2 and record["val_score"][0] == 1.0
    combined = chosen.combine(MEMBERS)
    torch.testing.assert_close(combined.probs, (MEMBERS["a"].probs + MEMBERS["b"].probs) / 2)
    assert greedy_selection(MEMBERS, rounds=1, metric="nll").weights == {"a": 1.0}


def test_greedy_repeats_members_and_keeps_the_best_prefix() -> None:
    chosen = greedy_selection(MEMBERS, rounds=12, metric="balanced_acc")
    record = chosen.to_dict()
    kept = record["kept_rounds"]
    assert "c" not in chosen.weights and sum(chosen.counts.values()) == kept and kept <= 12
    assert max(chosen.counts.values()) > 1  # a member picked twice: selection with replacement
    scores = [tuple(step["score"]) for step in record["path"]]
    assert tuple(record["val_score"]) == max(scores) == scores[kept - 1]  # the first best prefix
    assert all(score < max(scores) for score in scores[: kept - 1])
    assert sum(chosen.weights.values()) == pytest.approx(1.0)


def test_the_plain_mean_is_the_average_of_all_members() -> None:
    mean = plain_mean(list(MEMBERS))
    assert mean.weights == pytest.approx(dict.fromkeys(MEMBERS, 1 / 3))
    expected = np.mean([m.probs.numpy() for m in MEMBERS.values()], axis=0)
    np.testing.assert_allclose(mean.combine(MEMBERS).probs.numpy(), expected, rtol=1e-6)


def random_members(seed: int, n: int = 120, classes: int = 4) -> dict[str, SplitPredictions]:
    """Three members of different quality; class 3 has no image."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes - 1, n)
    members = {}
    for name, signal in (("good", 3.0), ("fair", 1.0), ("noise", 0.0)):
        logits = rng.normal(size=(n, classes))
        logits[np.arange(n), labels] += signal
        members[name] = SplitPredictions(
            torch.tensor(logits, dtype=torch.float32).softmax(1), torch.tensor(labels), torch.arange(n)
        )
    return members


def test_stacking_gives_probabilities_fitted_on_validation_with_grouped_folds() -> None:
    val, test = random_members(0), random_members(1, n=50)
    lesions = [f"lesion_{i // 3}" for i in range(120)]  # three photos per lesion
    stacker = Stacker.fit(val, lesions, folds=5, grouped=True)
    stacked = stacker.combine(test)
    assert stacked.probs.shape == (50, 4) and stacked.probs.dtype == torch.float32
    torch.testing.assert_close(stacked.probs.sum(1), torch.ones(50))
    assert (stacked.probs >= 0).all() and (stacked.probs[:, 3] == 0).all()  # a class validation never showed
    assert torch.equal(stacked.labels, test["good"].labels) and torch.equal(stacked.indices, test["good"].indices)
    record = stacker.to_dict()
    assert record["method"] == "stacking" and record["cv_groups"] == "lesion" and record["C"] in record["Cs"]
    assert record["members"] == ["good", "fair", "noise"] and record["class_weight"] == "balanced"
    accuracy = (stacked.probs.argmax(1) == stacked.labels).float().mean()
    assert accuracy > (test["fair"].probs.argmax(1) == test["fair"].labels).float().mean()


def test_the_stacking_record_names_the_grouping_its_folds_used() -> None:
    some_known = ["lesion_1", "lesion_1", "ISIC_3", "ISIC_4"]  # images without a lesion id stand for themselves
    assert cv_grouping(some_known, grouped=False) == "lesion (images without a lesion id alone)"
    assert cv_grouping(["ISIC_1", "ISIC_2", "ISIC_3"], grouped=False) == "image"
    assert cv_grouping(["lesion_1", "lesion_1", "lesion_2"], grouped=True) == "lesion"
    val = random_members(0, n=60)
    stacker = Stacker.fit(val, [f"lesion_{i // 3}" if i < 30 else f"ISIC_{i}" for i in range(60)], 3, grouped=False)
    assert stacker.to_dict()["cv_groups"] == "lesion (images without a lesion id alone)"
