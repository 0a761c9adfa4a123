"""Subgroup audit: each subgroup scored as the whole-split code scores it alone, paired with the whole split,
a subgroup made bad flagged and a fair one not, and bad metadata answered with notes, not exceptions."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from skinlesion.clinical.auroc import macro_auroc, weighted_auroc
from skinlesion.clinical.subgroups import TABLE_COLUMNS, age_bands, subgroup_audit
from skinlesion.labels import CLASSES
from skinlesion.models.metrics import probability_metrics

K = len(CLASSES)


def predictions(labels: np.ndarray, skill: float, seed: int) -> np.ndarray:
    """Probabilities whose true-class logit is raised by ``skill``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, (len(labels), K)) + skill * np.eye(K)[labels]
    return torch.tensor(logits).softmax(1).numpy()


def metadata_for(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "sex": rng.choice(["male", "female"], n),
            "age": rng.choice([25.0, 40.0, 50.0, 65.0, 80.0, np.nan], n),
            "localization": rng.choice(["back", "trunk", "face"], n),
            "dataset": rng.choice(["vidir_modern", "rosendahl"], n),
            "dx_type": rng.choice(["histo", "follow_up"], n),
        }
    )


def row(table: pd.DataFrame, column: str, subgroup: str) -> pd.Series:
    return table[(table["column"] == column) & (table["subgroup"] == subgroup)].iloc[0]


def test_two_class_subgroup_against_a_hand_computed_example() -> None:
    # female: mel, mel, nv, nv with p(mel) 0.9, 0.4, 0.3, 0.6 -> predicted mel, nv, nv, mel: recall 1/2 each,
    # balanced accuracy 1/2; AUROC: 3 of the 4 (mel, nv) pairs ranked right, 3/4 for both classes.
    classes = ("mel", "nv")
    labels = np.array([0, 0, 1, 1, 0, 1])
    p_mel = np.array([0.9, 0.4, 0.3, 0.6, 0.8, 0.1])
    probs = np.stack([p_mel, 1 - p_mel], axis=1)
    lesions = ["a", "a", "b", "c", "d", "e"]
    meta = pd.DataFrame({"sex": ["female"] * 4 + ["male"] * 2})
    table, _ = subgroup_audit(probs, labels, lesions, meta, classes=classes, columns=("sex",), n_resamples=200)
    female = row(table, "sex", "female")
    assert (female["n_images"], female["n_lesions"]) == (4, 3)
    assert female["balanced_acc"] == pytest.approx(0.5)
    assert female["recall_mel"] == pytest.approx(0.5)
    assert female["auroc_macro"] == pytest.approx(0.75)
    everyone = row(table, "all", "all")  # 5 of 6 right, mel 2/3 found, nv 2/3: balanced 2/3
    assert everyone["balanced_acc"] == pytest.approx(2 / 3)
    assert female["balanced_acc_diff"] == pytest.approx(0.5 - 2 / 3)


def test_each_subgroup_scores_like_the_whole_split_metrics_on_that_subgroup_alone() -> None:
    labels = np.repeat(np.arange(K), 60)
    probs = predictions(labels, skill=1.5, seed=1)
    lesions = np.arange(len(labels)) // 2  # two photos of every lesion
    meta = metadata_for(len(labels) // 2, seed=2).loc[np.arange(len(labels)) // 2].reset_index(drop=True)
    table, notes = subgroup_audit(probs, labels, lesions, meta, min_site_lesions=1, n_resamples=200)
    checked = 0
    for _, subgroup in table.iterrows():
        mask = np.ones(len(labels), bool)
        if subgroup["column"] == "age":
            mask = (age_bands(meta["age"])[0] == subgroup["subgroup"]).to_numpy()
        elif subgroup["column"] != "all":
            mask = (meta[subgroup["column"]] == subgroup["subgroup"]).to_numpy()
        if len(np.unique(labels[mask])) < K:  # torchmetrics averages an absent class's AUROC as 0
            continue
        alone = probability_metrics(torch.tensor(probs[mask]).float(), torch.tensor(labels[mask]), "s", CLASSES)
        assert subgroup["n_images"] == mask.sum()
        assert subgroup["n_lesions"] == len(np.unique(lesions[mask]))
        assert subgroup["balanced_acc"] == pytest.approx(alone["s/balanced_acc"], abs=1e-6)
        assert subgroup["recall_mel"] == pytest.approx(alone["s/recall_mel"], abs=1e-6)
        assert subgroup["auroc_macro"] == pytest.approx(alone["s/auroc_macro"], abs=1e-5)
        assert subgroup["balanced_acc_low"] <= subgroup["balanced_acc"] <= subgroup["balanced_acc_high"]
        checked += 1
    assert checked >= 15  # all, both sexes, age bands, sites, both clinics, both kinds of truth
    assert list(table.columns) == TABLE_COLUMNS
    assert not any("not in the metadata" in note for note in notes)


def test_weighted_auroc_matches_scikit_learn_with_the_same_weights_and_leaves_absent_classes_out() -> None:
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(80), 1)  # many ties
    positive = rng.random(80) < 0.3
    weights = rng.integers(0, 3, (5, 80)).astype(float)
    for w, ours in zip(weights, weighted_auroc(scores, positive, weights), strict=True):
        assert ours == pytest.approx(roc_auc_score(positive, scores, sample_weight=w))
    assert np.isnan(weighted_auroc(scores, np.zeros(80, bool), weights)).all()
    labels = rng.integers(0, 3, 80)  # classes 3..6 absent: the mean of the three present ones
    probs = rng.dirichlet(np.ones(K), 80)
    expected = np.mean([roc_auc_score(labels == k, probs[:, k]) for k in range(3)])
    assert macro_auroc(probs, labels, np.ones((1, 80)))[0] == pytest.approx(expected)


def test_a_subgroup_made_bad_is_flagged_and_fair_ones_are_not() -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, K, 700)
    face = np.arange(700) < 120
    probs = np.where(face[:, None], predictions(labels, 0.0, seed=5), predictions(labels, 4.0, seed=6))
    meta = pd.DataFrame({"localization": np.where(face, "face", "back"), "sex": rng.choice(["male", "female"], 700)})
    table, _ = subgroup_audit(probs, labels, np.arange(700), meta, columns=("localization", "sex"), n_resamples=400)
    bad = row(table, "localization", "face")
    assert bad["flagged"] and bad["balanced_acc_flagged"] and bad["auroc_macro_flagged"]
    assert bad["balanced_acc_high"] < row(table, "all", "all")["balanced_acc"]
    assert bad["balanced_acc_diff_high"] < 0
    assert not row(table, "localization", "back")["flagged"]
    assert not table.loc[table["column"] == "sex", "flagged"].any()


def test_a_subgroup_that_is_the_whole_split_differs_by_exactly_zero_in_every_resample() -> None:
    # Paired: subgroup and whole split are scored on the same resamples, so an interval for the difference
    # of two identical scores is (0, 0), where two independent bootstraps would give a wide one.
    labels = np.repeat(np.arange(K), 20)
    probs = predictions(labels, 1.0, seed=7)
    meta = pd.DataFrame({"dataset": ["rosendahl"] * len(labels)})
    table, _ = subgroup_audit(probs, labels, np.arange(len(labels)), meta, columns=("dataset",))
    same = row(table, "dataset", "rosendahl")
    for metric in ("balanced_acc", "recall_mel", "auroc_macro"):
        assert (same[f"{metric}_diff_low"], same[f"{metric}_diff_high"]) == (0.0, 0.0)
        assert same[f"{metric}_high"] > same[f"{metric}_low"]
        assert not same[f"{metric}_flagged"]


def test_small_sites_are_pooled_into_other_and_the_rule_is_recorded() -> None:
    sites = ["back"] * 30 + ["face"] * 25 + ["ear"] * 4 + ["acral"] * 6 + ["unknown"] * 3
    labels = np.arange(len(sites)) % K
    probs = predictions(labels, 2.0, seed=8)
    table, notes = subgroup_audit(
        probs, labels, np.arange(len(sites)), pd.DataFrame({"localization": sites}), min_site_lesions=20
    )
    rows = table[table["column"] == "localization"].set_index("subgroup")
    assert list(rows.index) == ["back", "face", "unknown", "other"]
    assert rows.loc["other", "n_images"] == 10
    assert rows.loc["other", "pooled"] == "acral, ear"
    assert rows.loc["unknown", "n_images"] == 3  # not a site: never pooled
    assert any("fewer than 20 lesions" in note and "acral (6), ear (4)" in note for note in notes)


def test_age_bands_at_their_edges_and_values_that_are_not_ages() -> None:
    ages = pd.Series(["29", "30", "44.0", "45", "59", "60", "74", "75", "85", "", None, "abc", "-5", "200"])
    bands, notes = age_bands(ages)
    expected = ["<30", "30-44", "30-44", "45-59", "45-59", "60-74", "60-74", ">=75", ">=75"] + ["missing"] * 5
    assert list(bands) == expected
    assert len(notes) == 1 and "3 value(s) are not ages" in notes[0] and "'abc'" in notes[0]


def test_a_missing_column_and_unexpected_values_give_notes_not_errors(caplog: pytest.LogCaptureFixture) -> None:
    labels = np.arange(70) % K
    probs = predictions(labels, 2.0, seed=9)
    meta = pd.DataFrame({"sex": ["male"] * 30 + ["M"] * 10 + ["female"] * 30, "age": ["abc"] + ["50"] * 69})
    with caplog.at_level(logging.WARNING, logger="skinlesion.clinical.subgroups"):
        table, notes = subgroup_audit(probs, labels, np.arange(70), meta, n_resamples=100)
    assert {"localization: not in the metadata, not audited", "dataset: not in the metadata, not audited"} <= set(notes)
    assert any(note.startswith("sex: 10 value(s) outside HAM10000's") and "'m' (10)" in note for note in notes)
    assert any(note.startswith("age: 1 value(s) are not ages") for note in notes)
    assert set(caplog.messages) == set(notes)  # every note is logged as well
    assert row(table, "sex", "m")["n_images"] == 10  # audited as it is
    assert row(table, "age", "missing")["n_images"] == 1
    assert set(table["column"]) == {"all", "sex", "age"}


@pytest.mark.parametrize("metadata", [None, pd.DataFrame({"image_id": ["x"] * 14})])
def test_a_set_without_metadata_gives_an_empty_table_and_a_note(metadata: pd.DataFrame | None) -> None:
    labels = np.arange(14) % K
    table, notes = subgroup_audit(predictions(labels, 1.0, seed=10), labels, np.arange(14), metadata)
    assert table.empty and list(table.columns) == TABLE_COLUMNS
    assert notes == [
        "no subgroup metadata in this set (sex, age, localization, dataset, dx_type), subgroup audit skipped"
    ]
