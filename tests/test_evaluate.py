"""`evaluate` reproduces a run's test metrics, adds TTA, reads external ISIC 2018 sets, and fails clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from skinlesion.data.layouts import load_records
from skinlesion.errors import CheckpointError, ConfigError, DataError
from skinlesion.evaluate import evaluate
from skinlesion.inference.tta import predict_proba_tta
from skinlesion.labels import CLASSES, ISIC_COLUMNS
from skinlesion.runfolder.checkpoints import load_classifier
from skinlesion.runfolder.summary import RunSummary

from conftest import compose_config, run_cli

PROBS = [f"prob_{c}" for c in CLASSES]


@pytest.fixture
def run(trained_run: Path) -> Path:
    return trained_run


FIGURES_OFF = ["clinical.figures=false"]  # the clinical PNGs take seconds; test_clinical_commands checks them


def run_evaluate(tmp_path: Path, *overrides: str) -> RunSummary:
    out = tmp_path / "eval"
    return evaluate(
        compose_config("evaluate", [f"paths.root_dir={tmp_path}", f"paths.output_dir={out}", *FIGURES_OFF, *overrides])
    )


def read_predictions(folder: Path, split: str = "test") -> pd.DataFrame:
    return pd.read_csv(folder / f"predictions_{split}.csv")


def test_evaluate_reproduces_the_test_metrics_logged_by_training(run: Path, tmp_path: Path) -> None:
    result = run_evaluate(tmp_path, f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}")
    trained = json.loads((run / "metrics.json").read_text())["metrics"]
    assert len(result.metrics) > 20 and set(result.metrics) <= set(trained)
    assert result.metrics == pytest.approx({k: trained[k] for k in result.metrics}, abs=1e-5)
    assert result.split_check == {"split_from": "data", "same_as": [str(run / "split.csv")]}

    out = tmp_path / "eval"
    ours, theirs = read_predictions(out), read_predictions(run)
    assert list(ours.columns) == ["image_id", "lesion_id", "lesion_known", "true", *PROBS, "pred"]
    assert list(ours["lesion_id"]) == list(theirs["lesion_id"])
    assert list(ours["image_id"]) == list(theirs["image_id"])
    assert list(ours["true"]) == list(theirs["true"])
    np.testing.assert_allclose(ours[PROBS].to_numpy(), theirs[PROBS].to_numpy(), atol=1e-5)
    for name in (
        "metrics.json",
        "confusion_matrix_test.png",
        "classification_report_test.txt",
        "roc_test.png",
        "reliability_test.png",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["task"] == "evaluate" and saved["images"] == len(theirs) and saved["tta_views"] == 1


def test_a_checkpoint_saved_before_the_typed_data_settings_evaluates_the_same(run: Path, tmp_path: Path) -> None:
    """Older checkpoints keep the data sub-settings as the config gave them: keys missing, ``augment`` null."""
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    data = checkpoint["datamodule_hyper_parameters"]
    data["cache"] = {"dir": data["cache"]["dir"]}
    data["augment"] = None
    del data["test_set"], data["split"]["num_folds"], data["split"]["fold"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    result = run_evaluate(tmp_path, f"ckpt_path={old}")
    trained = json.loads((run / "metrics.json").read_text())["metrics"]
    assert result.metrics == pytest.approx({k: trained[k] for k in result.metrics}, abs=1e-5)


def test_tta_changes_probabilities_but_not_shapes(run: Path, tmp_path: Path) -> None:
    checkpoint = run / "checkpoints" / "best.ckpt"
    run_evaluate(tmp_path / "plain", f"ckpt_path={checkpoint}", "split=val")
    result = run_evaluate(tmp_path / "tta", f"ckpt_path={checkpoint}", "split=val", "tta=true")
    plain, tta = (
        read_predictions(tmp_path / "plain" / "eval", "val"),
        read_predictions(tmp_path / "tta" / "eval", "val"),
    )
    assert tta.shape == plain.shape and list(tta["image_id"]) == list(plain["image_id"])
    np.testing.assert_allclose(tta[PROBS].sum(axis=1), 1.0, atol=1e-5)
    assert not np.allclose(tta[PROBS].to_numpy(), plain[PROBS].to_numpy(), atol=1e-4)
    assert result.tta_views == 8 and "val/balanced_acc" in result.metrics

    model = load_classifier(checkpoint)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    rotated = predict_proba_tta(model, torch.rot90(images, 1, dims=(2, 3)), views=8)
    assert torch.allclose(rotated, predict_proba_tta(model, images, views=8), atol=1e-5)  # D4-invariant


def make_isic_test_set(root: Path, source: Path, per_class: int = 3, keep_ids: bool = False) -> pd.DataFrame:
    """The ISIC 2018 Task 3 test layout: images + one-hot ground truth (columns in a non-alphabetical order)."""
    records = load_records(source).groupby("dx").head(per_class).reset_index(drop=True)
    images = root / "ISIC2018_Task3_Test_Input"
    images.mkdir(parents=True)
    ids = list(records["image_id"]) if keep_ids else [f"ISIC_{9_000_000 + i:07d}" for i in range(len(records))]
    for image_id, path in zip(ids, records["path"], strict=True):
        shutil.copy(path, images / f"{image_id}.jpg")
    truth = pd.DataFrame({"image": ids})
    for column, dx in ISIC_COLUMNS.items():  # MEL, NV, BCC, ... as in the official file
        truth[column] = (records["dx"] == dx).astype(float)
    folder = root / "ISIC2018_Task3_Test_GroundTruth"
    folder.mkdir()
    truth.to_csv(folder / "ISIC2018_Task3_Test_GroundTruth.csv", index=False)
    return pd.DataFrame({"image_id": ids, "true": records["dx"]})


def test_external_isic2018_set_in_one_hot_format(run: Path, tmp_path: Path, synthetic_root: Path) -> None:
    isic = tmp_path / "ISIC2018"
    expected = make_isic_test_set(isic, synthetic_root)
    checkpoint = f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}"
    result = run_evaluate(tmp_path / "a", checkpoint, f"data.test_set.root={isic}", "data.test_set.layout=isic2018")
    predictions = read_predictions(tmp_path / "a" / "eval").sort_values("image_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(predictions[["image_id", "true"]], expected)
    assert result.images == len(expected) == 3 * len(CLASSES)
    assert result.dataset["root"] == str(isic)
    assert result.split_check == {"split_from": "external set", "disjoint_from": [str(run / "split.csv")]}

    # The same set chosen as a dataset config: the whole of it is the test split.
    again = run_evaluate(tmp_path / "b", checkpoint, "data=isic2018", f"data.root={isic}", "data.subset=Test")
    assert again.metrics == pytest.approx(result.metrics, abs=1e-6)

    # A dataset config with a test_set of its own: that test set, not the dataset, is evaluated.
    paired = run_evaluate(tmp_path / "d", checkpoint, "data=ham10000_isic2018_test", f"data.test_set.root={isic}")
    assert paired.metrics == pytest.approx(result.metrics, abs=1e-6)

    # A checkpoint shared without its training data: the external set alone is read.
    elsewhere = (f"data.root={tmp_path / 'training-data-not-here'}", f"data.test_set.root={isic}")
    alone = run_evaluate(tmp_path / "c", checkpoint, *elsewhere, "data.test_set.layout=isic2018")
    assert alone.metrics == pytest.approx(result.metrics, abs=1e-6)


def test_an_external_set_holding_training_images_is_refused(run: Path, tmp_path: Path, synthetic_root: Path) -> None:
    isic = tmp_path / "ISIC2018"
    make_isic_test_set(isic, synthetic_root, keep_ids=True)  # the very images the run trained on
    checkpoint = run / "checkpoints" / "best.ckpt"
    trained_on = pd.read_csv(run / "split.csv").query("split != 'test'")["image_id"]
    overlap = sorted(set(trained_on) & set(pd.read_csv(next(isic.glob("*/*GroundTruth.csv")))["image"]))
    assert overlap  # the fixture really does reuse training images
    external = (f"data.test_set.root={isic}", "data.test_set.layout=isic2018")
    with pytest.raises(DataError, match=rf"{len(overlap)} image_id\(s\) of the external test set are also in the"):
        run_evaluate(tmp_path / "a", f"ckpt_path={checkpoint}", *external)

    # A checkpoint shared without its run folder cannot be checked: it is evaluated, with a warning.
    alone = tmp_path / "shared" / "model.ckpt"
    alone.parent.mkdir()
    shutil.copy(checkpoint, alone)
    assert run_evaluate(tmp_path / "b", f"ckpt_path={alone}", *external).images == 3 * len(CLASSES)


def test_checkpoints_and_settings_fail_with_one_clear_message(run: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        run_evaluate(tmp_path, f"ckpt_path={corrupt}")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        run_evaluate(tmp_path, f"ckpt_path={tmp_path / 'missing.ckpt'}")
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        run_evaluate(tmp_path)
    with pytest.raises(ConfigError, match="split=train is not valid"):
        run_evaluate(tmp_path, f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", "split=train")

    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    checkpoint["datamodule_hyper_parameters"]["split"]["test"] = 0  # trained without a test split
    no_test = tmp_path / "no-test.ckpt"
    torch.save(checkpoint, no_test)
    with pytest.raises(ConfigError, match=r"no 'test' split.*split=val"):
        run_evaluate(tmp_path, f"ckpt_path={no_test}")


def test_command_line_prints_one_error_line_for_a_corrupt_checkpoint(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00" * 64)
    result = run_cli(tmp_path, "skinlesion.evaluate", f"ckpt_path={corrupt}", timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(corrupt) in errors[0] and "Traceback" not in result.stderr


def test_a_set_without_lesion_groupings_has_image_bootstrap_intervals_and_warns_once(
    run: Path, tmp_path: Path, synthetic_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    isic = tmp_path / "ISIC2018"
    make_isic_test_set(isic, synthetic_root)  # no ISIC2018_Task3_Test_LesionGroupings.csv
    checkpoint = f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}"
    external = (f"data.test_set.root={isic}", "data.test_set.layout=isic2018")
    with caplog.at_level("WARNING"):
        result = run_evaluate(tmp_path / "a", checkpoint, *external)
        run_evaluate(tmp_path / "b", checkpoint, *external)
    warnings = [r for r in caplog.records if "ISIC2018_Task3_Test_LesionGroupings.csv not found" in r.getMessage()]
    assert len(warnings) == 1 and "resample images" in warnings[0].getMessage()
    method = json.loads((tmp_path / "a" / "eval" / "metrics.json").read_text())["interval_method"]
    assert method == result.interval_method
    assert method["test"]["resampled"] == "image" and "no lesion groupings" in method["test"]["reason"]
    assert pd.read_csv(tmp_path / "a" / "eval" / "models_test.csv")["ci_resampled"].tolist() == ["image"]
    assert not read_predictions(tmp_path / "a" / "eval")["lesion_known"].any()


def test_training_records_that_its_intervals_resample_lesions(run: Path) -> None:
    method = json.loads((run / "metrics.json").read_text())["interval_method"]
    assert set(method) == {"val", "test"} and {m["resampled"] for m in method.values()} == {"lesion"}
    assert read_predictions(run)["lesion_known"].all()
