"""The DataModule end to end: batches, run files, class weights, sampler, external test set, real data."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from skinlesion.data.datamodule import SkinLesionDataModule, class_weights_from_counts
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.errors import ConfigError, DataError
from skinlesion.labels import CLASSES

PRE = Preprocessing(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)


def make(root: Path, cache_dir: Path, output_dir: Path | None = None, **settings) -> SkinLesionDataModule:
    settings = {"num_workers": 0, "batch_size": 16, "cache": {"dir": str(cache_dir)}, **settings}
    return SkinLesionDataModule(str(root), preprocessing=PRE, output_dir=output_dir and str(output_dir), **settings)


def test_the_hydra_config_builds_a_datamodule_whose_batches_are_uint8_dicts(train_cfg, tmp_path: Path) -> None:
    cfg = train_cfg("data.num_workers=1")
    dm = instantiate(cfg.data, preprocessing=PRE.to_dict(), output_dir=str(tmp_path / "run"))
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "index"}
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (16, 3, 32, 32)
    rows = dm.records.loc[batch["index"].numpy()]
    assert (rows["split"] == "train").all() and rows["label"].tolist() == batch["label"].tolist()
    assert {"image_id", "lesion_id", "dx", "label", "path", "split", "source"} <= set(dm.records.columns)
    assert dm.has_test and set(dm.datasets) == {"train", "val", "test"}
    assert len(dm.split_records("val")) == len(dm.datasets["val"])
    assert dm.train_dataloader().persistent_workers and not dm.train_dataloader().pin_memory  # no GPU here
    with pytest.raises(ConfigError, match="there is no 'holdout' split; available: train, val, test"):
        dm.eval_dataloader("holdout")


def test_split_csv_is_written_and_identical_for_the_same_seed(synthetic_root, cache_dir, tmp_path: Path) -> None:
    for name in ("a", "b"):
        make(synthetic_root, cache_dir, tmp_path / name).setup()
    first = (tmp_path / "a" / "split.csv").read_text()
    assert first == (tmp_path / "b" / "split.csv").read_text()
    split = pd.read_csv(tmp_path / "a" / "split.csv")
    assert list(split.columns) == ["image_id", "lesion_id", "dx", "label", "split", "source"]  # no machine paths
    assert split.groupby("lesion_id")["split"].nunique().max() == 1
    make(synthetic_root, cache_dir, tmp_path / "c", split={"seed": 1}).setup()
    assert (tmp_path / "c" / "split.csv").read_text() != first


def test_class_weights_balanced_sqrt_none() -> None:
    counts = np.array([10, 20, 40, 0, 10, 100, 20])
    balanced = class_weights_from_counts(counts, "balanced")
    assert balanced[3] == 0 and torch.allclose(balanced[[0, 5]], torch.tensor([200 / (6 * 10), 200 / (6 * 100)]))
    assert torch.allclose(class_weights_from_counts(counts, "sqrt"), balanced.sqrt())
    assert class_weights_from_counts(counts, "none") is None


def test_class_weights_come_from_the_training_split(synthetic_root, cache_dir) -> None:
    dm = make(synthetic_root, cache_dir)
    counts = dm.split_records("train")["label"].value_counts().reindex(range(len(CLASSES)), fill_value=0).to_numpy()
    assert torch.allclose(dm.class_weights, torch.tensor(counts.sum() / (7 * counts), dtype=torch.float32))


def test_balanced_sampler_draws_every_class_about_equally(synthetic_root, cache_dir) -> None:
    dm = make(synthetic_root, cache_dir, balanced_sampler=True, class_weights="none", batch_size=64)
    dm.setup("fit")
    torch.manual_seed(0)
    labels = torch.cat([b["label"] for _ in range(4) for b in dm.train_dataloader()])
    shares = torch.bincount(labels, minlength=len(CLASSES)) / len(labels)
    assert shares.min() > 0.09 and shares.max() < 0.2  # 1/7 each, against nv's ~2/3 without the sampler


def test_an_external_test_set_replaces_the_internal_test_split(synthetic_root, cache_dir, tmp_path: Path) -> None:
    external = tmp_path / "ISIC2018"
    folder = external / "ISIC2018_Task3_Test_Input"
    folder.mkdir(parents=True)
    images = sorted(synthetic_root.glob("*/*.jpg"))[:5]
    rows = []
    for i, path in enumerate(images):
        shutil.copy(path, folder / f"ISIC_99{i:05d}.jpg")
        rows.append({"image": f"ISIC_99{i:05d}", **{c: float(c == "NV") for c in ("MEL", "NV", "BCC", "AKIEC")}})
    truth = pd.DataFrame(rows).assign(BKL=0.0, DF=0.0, VASC=0.0)
    (external / "ISIC2018_Task3_Test_GroundTruth").mkdir()
    truth.to_csv(external / "ISIC2018_Task3_Test_GroundTruth" / "ISIC2018_Task3_Test_GroundTruth.csv", index=False)

    dm = make(synthetic_root, cache_dir, tmp_path / "run", test_set={"root": str(external), "layout": "isic2018"})
    dm.setup()
    test = dm.split_records("test")
    assert (test["source"] == "test_set").all() and len(test) == 5 and (test["dx"] == "nv").all()
    assert set(dm.split_records("train")["source"]) == {"main"}
    assert len(dm.datasets["test"]) == 5
    assert next(iter(dm.eval_dataloader("test")))["image"].shape == (5, 3, 32, 32)

    shutil.copy(images[0], folder / "ISIC_0024306.jpg")  # an image of the training data
    truth.iloc[:1].assign(image="ISIC_0024306").pipe(
        lambda t: pd.concat([truth, t]).to_csv(next(external.glob("*_GroundTruth/*.csv")), index=False)
    )
    with pytest.raises(DataError, match=r"1 image_id\(s\) of the external test set are also in the training data"):
        make(synthetic_root, cache_dir, test_set={"root": str(external), "layout": "isic2018"}).setup()


# ---- the real HAM10000 subset (5,984 of 10,015 listed images present) ------------------------------------
def test_real_subset_missing_images_stop_the_run_by_default(ham_subset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        make(ham_subset, tmp_path / "cache", tmp_path / "run").setup()
    message = str(err.value)
    assert "HAM10000_metadata.csv: 4,031 of 10,015 listed images are unusable (missing file: 4,031)" in message
    assert "data.on_bad_image=skip" in message and "\n" not in message
    assert len(pd.read_csv(tmp_path / "run" / "bad_images.csv")) == 4031
    assert not (tmp_path / "cache").exists()  # nothing decoded before the error


@pytest.mark.slow
def test_real_subset_skips_the_missing_images_and_trains_one_epoch(ham_subset: Path, train_cfg, tmp_path) -> None:
    cfg = train_cfg(f"data.root={ham_subset}", "data.on_bad_image=skip", "data.batch_size=32")
    module = instantiate(cfg.module)
    dm = instantiate(cfg.data, preprocessing=module.preprocessing, output_dir=str(tmp_path / "run"))
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        limit_train_batches=5,  # one epoch, cut short: the data path is what is under test
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.current_epoch == 1 and np.isfinite(float(trainer.callback_metrics["val/loss"]))
    assert len(dm.records) == 5984
    assert not dm.split_records("train")["lesion_id"].isin(dm.split_records("test")["lesion_id"]).any()
    skipped = pd.read_csv(tmp_path / "run" / "skipped_images.csv")
    assert len(skipped) == 4031 and (skipped["reason"] == "missing file").all()
    assert len(pd.read_csv(tmp_path / "run" / "split.csv")) == 5984


def test_centre_crop_shows_the_training_split_the_field_of_view_of_evaluation(synthetic_root, cache_dir) -> None:
    augment_off = {key: 0 for key in ("rotate", "zoom", "shift", "brightness", "contrast", "hue", "saturation")}
    datamodule = make(synthetic_root, cache_dir, center_crop=True, augment=augment_off | {"hflip": 0, "vflip": 0})
    datamodule.setup()
    train, val = datamodule.datasets["train"], datamodule.datasets["val"]
    for i in range(3):
        as_evaluated = val.transform(image=train.load(i))["image"]  # the validation pipeline on a training image
        np.testing.assert_array_equal(train[i]["image"].numpy().transpose(1, 2, 0), as_evaluated)
