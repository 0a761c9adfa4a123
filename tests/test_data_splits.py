"""Leak-free, stratified, reproducible splits and k-fold cross-validation (records only, no images)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from skinlesion.data.datamodule import SkinLesionDataModule
from skinlesion.data.specs import SplitSpec
from skinlesion.data.splits import assign_splits, check_disjoint
from skinlesion.data.synthetic import plan_lesions
from skinlesion.errors import ConfigError, DataError
from skinlesion.labels import CLASS_TO_INDEX, CLASSES


def records_like_ham(n_images: int = 2000, seed: int = 0, min_lesions: int = 20) -> pd.DataFrame:
    """HAM10000's class proportions and photos-per-lesion (the synthetic generator's plan, no images)."""
    rows = []
    for lesion, photos in plan_lesions(n_images, seed, min_lesions):
        rows += [(lesion.lesion_id, lesion.dx) for _ in range(photos)]
    frame = pd.DataFrame(rows, columns=["lesion_id", "dx"])
    frame.insert(0, "image_id", [f"ISIC_{i:07d}" for i in range(len(frame))])
    frame["label"] = frame["dx"].map(CLASS_TO_INDEX)
    return frame


@pytest.fixture(scope="module")
def records() -> pd.DataFrame:
    return records_like_ham()


def test_default_split_keeps_every_lesion_in_one_split_with_about_70_15_15(records: pd.DataFrame) -> None:
    split = assign_splits(records)
    splits_per_lesion = records.assign(split=split).groupby("lesion_id")["split"].nunique()
    assert splits_per_lesion.max() == 1
    assert (records.groupby("lesion_id").size() > 1).any()  # the check is meaningful: lesions with several photos
    shares = split.value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.70, abs=0.025)
    assert shares["val"] == pytest.approx(0.15, abs=0.015)
    assert shares["test"] == pytest.approx(0.15, abs=0.015)


def test_each_split_keeps_the_class_proportions(records: pd.DataFrame) -> None:
    split = assign_splits(records)
    overall = records["dx"].value_counts(normalize=True)
    for name in ("train", "val", "test"):
        share = records.loc[split == name, "dx"].value_counts(normalize=True).reindex(CLASSES, fill_value=0)
        assert (share - overall.reindex(CLASSES)).abs().max() < 0.02, name
        assert (share > 0).all(), f"{name} lacks a class"


def test_same_seed_same_split_whatever_the_row_order_and_another_seed_differs(records: pd.DataFrame) -> None:
    split = assign_splits(records, seed=7)
    shuffled = records.sample(frac=1.0, random_state=3).reset_index(drop=True)
    again = assign_splits(shuffled, seed=7)
    by_image = dict(zip(shuffled["image_id"], again))
    assert [by_image[i] for i in records["image_id"]] == split.tolist()
    assert not assign_splits(records, seed=8).equals(split)


def test_split_is_pinned_so_any_machine_gets_the_same_one(records: pd.DataFrame) -> None:
    # The split depends on numpy's legacy RandomState and scikit-learn's StratifiedGroupKFold only;
    # if either changes what it draws, this fails and the change must be noticed, not silently shipped.
    split = assign_splits(records, seed=42)
    digest = hashlib.sha256("".join(f"{i}:{s}\n" for i, s in zip(records["image_id"], split)).encode())
    assert split.value_counts().to_dict() == {"train": 1428, "val": 286, "test": 286}
    assert digest.hexdigest()[:16] == "a43e918b6d3bd4be"


def test_a_split_spec_and_the_same_settings_as_keywords_give_the_same_split(records: pd.DataFrame) -> None:
    """The DataModule passes its SplitSpec; the keywords are the same settings, the rest SplitSpec's defaults."""
    assert assign_splits(records, SplitSpec(seed=7)).equals(assign_splits(records, seed=7))
    with pytest.raises(TypeError, match="not both"):
        assign_splits(records, SplitSpec(), seed=7)


def test_k_folds_partition_the_non_test_records_and_share_one_test_split() -> None:
    records = records_like_ham(1200)
    folds = [assign_splits(records, num_folds=5, fold=k) for k in range(5)]
    test = folds[0] == "test"
    for split in folds:
        assert split.eq("test").equals(test)  # the same test lesions for every fold
        assert records.assign(split=split).groupby("lesion_id")["split"].nunique().max() == 1
    val_sets = [set(records.index[split == "val"]) for split in folds]
    assert set().union(*val_sets) == set(records.index[~test])
    assert sum(len(v) for v in val_sets) == int((~test).sum())  # disjoint
    assert all(len(v) == pytest.approx((~test).sum() / 5, rel=0.1) for v in val_sets)


def test_image_stratified_reproduces_the_original_80_20_split_by_image(records: pd.DataFrame) -> None:
    split = assign_splits(records, strategy="image_stratified")
    assert split.value_counts(normalize=True).to_dict() == pytest.approx({"train": 0.8, "val": 0.2}, abs=0.005)
    # Grouping by image puts photos of one lesion on both sides: the leak the default strategy prevents.
    assert (records.assign(split=split).groupby("lesion_id")["split"].nunique() > 1).any()


def test_too_few_lesions_of_a_class_is_a_clear_error() -> None:
    frame = records_like_ham(600, min_lesions=4)
    with pytest.raises(DataError, match=r"too few lesions per class for data.split.test=0.15 \(7 folds .*df has 6"):
        assign_splits(frame)
    with pytest.raises(DataError, match=r"data.split.num_folds=10 .*at least 10 lesions"):
        assign_splits(frame, test=0.0, num_folds=10, fold=0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"strategy": "by_patient"}, "unknown data.split.strategy 'by_patient'"),
        ({"val": 0.5, "test": 0.5}, "leaves nothing to train on"),
        ({"fold": 1}, "needs data.split.num_folds"),
        ({"num_folds": 5, "fold": 5}, r"must be in 0..4"),
        ({"num_folds": 1, "fold": 0}, "must be at least 2"),
        ({"val": 0.0}, r"data.split.val=0 must be between 0 and 1"),
    ],
)
def test_invalid_split_settings_name_the_setting(records: pd.DataFrame, settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        assign_splits(records, **settings)


def test_an_external_test_set_sharing_images_or_lesions_is_refused(records: pd.DataFrame) -> None:
    external = records.head(3).copy()
    with pytest.raises(DataError, match=r"3 image_id\(s\) of the external test set are also in the training data"):
        check_disjoint(records, external, "ISIC2018")
    external["image_id"] = ["X1", "X2", "X3"]
    with pytest.raises(DataError, match="lesion_id"):
        check_disjoint(records, external, "ISIC2018")
    external["lesion_id"] = external["image_id"]
    check_disjoint(records, external, "ISIC2018")


@pytest.mark.parametrize(
    ("split", "pattern"),
    [
        ({"num_folds": 5, "fold": 5}, r"fold=5 must be in 0\.\.4"),
        ({"num_folds": 1, "fold": 0}, r"num_folds=1 must be at least 2"),
        ({"val": 0.6, "test": 0.5}, r"leaves nothing to train on"),
    ],
)
def test_impossible_split_settings_fail_before_any_file_is_read(tmp_path: Path, split: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        SkinLesionDataModule(str(tmp_path / "not-read"), split=split)
    with pytest.raises(ConfigError, match=r"unknown data\.augment key"):
        SkinLesionDataModule(str(tmp_path / "not-read"), augment={"rotation": 90})
