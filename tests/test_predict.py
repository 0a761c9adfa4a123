"""Predict reads any folder, reports bad files per row, and uses the checkpoint's own settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skinlesion.clinical.thresholds import DECISION_COLUMNS
from skinlesion.data.layouts import load_records
from skinlesion.errors import ConfigError, DataError
from skinlesion.inference.model import InferenceModel
from skinlesion.inference.tta import ViewPlan, dihedral_views
from skinlesion.labels import CLASSES
from skinlesion.predict import predict

from conftest import compose_config, random_checkpoint, run_cli

IMAGE_SIZE = 40  # not a backbone default: predict must take it from the checkpoint
TEMPERATURE = 2.5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MobileNetV2 checkpoint (random weights) as skinlesion.train saves one."""
    path = tmp_path_factory.mktemp("checkpoint") / "best.ckpt"
    return random_checkpoint(path, "mobilenetv2", IMAGE_SIZE, TEMPERATURE, head_std=0.5)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> Path:
    """Two good JPEGs, a grayscale PNG (good), a truncated JPEG and a text file (bad)."""
    folder = tmp_path_factory.mktemp("inputs")
    sources = load_records(synthetic_root)["path"].head(3).tolist()
    for source in sources[:2]:
        (folder / Path(source).name).write_bytes(Path(source).read_bytes())
    Image.open(sources[2]).convert("L").save(folder / "gray.png")
    data = Path(sources[0]).read_bytes()
    (folder / "corrupt.jpg").write_bytes(data[: len(data) // 3])
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def predict_cfg(tmp_path: Path, checkpoint: Path, source: Path, *overrides: str):
    return compose_config(
        "predict",
        [
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path / 'run'}",
            f"ckpt_path={checkpoint}",
            f"input={source}",
            "device=cpu",
            *overrides,
        ],
    )


def test_folder_with_bad_files_gives_one_row_each_and_errors_for_the_bad(
    tmp_path: Path, checkpoint: Path, mixed_folder: Path
) -> None:
    frame = predict(predict_cfg(tmp_path, checkpoint, mixed_folder))

    assert sorted(Path(p).name for p in frame["path"]) == sorted(p.name for p in mixed_folder.iterdir())
    rows = frame.set_index(frame["path"].map(lambda p: Path(p).name))
    assert "truncated" in rows.loc["corrupt.jpg", "error"] or "corrupt" in rows.loc["corrupt.jpg", "error"]
    assert "not an image" in rows.loc["notes.txt", "error"]
    bad = rows.loc[["corrupt.jpg", "notes.txt"]]
    assert bad[[f"prob_{c}" for c in CLASSES]].isna().all().all() and bad["pred"].isna().all()

    good = rows[rows["error"] == ""]
    assert len(good) == 3 and "gray.png" in good.index
    probs = good[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (good["pred"] == [CLASSES[k] for k in probs.argmax(1)]).all()
    assert all(t.split("; ")[0].startswith(p) for t, p in zip(good["top3"], good["pred"], strict=True))
    assert len(good["top3"].iloc[0].split("; ")) == 3

    written = pd.read_csv(tmp_path / "run" / "predictions.csv", keep_default_na=False)
    assert list(written["path"]) == list(frame["path"])
    assert (tmp_path / "run" / "predict.json").is_file()


def test_probabilities_use_the_checkpoint_preprocessing_temperature_and_tta(
    tmp_path: Path, checkpoint: Path, mixed_folder: Path
) -> None:
    image_path = next(mixed_folder.glob("ISIC_*.jpg"))
    loaded = InferenceModel.load(checkpoint, "cpu")
    pre = loaded.model.preprocessing
    assert pre.image_size == IMAGE_SIZE  # stored in the checkpoint, not the backbone's default
    image = loaded.load_input(image_path)[None]  # the validation loader's pixels: see the test below
    assert image.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)
    logits = loaded.model(loaded.model.normalize(image)).detach()

    def probs_of(*overrides: str) -> np.ndarray:
        out = tmp_path / f"{len(list(tmp_path.glob('*.csv')))}.csv"
        frame = predict(predict_cfg(tmp_path, checkpoint, image_path, f"out={out}", *overrides))
        return frame[[f"prob_{c}" for c in CLASSES]].to_numpy()[0]

    np.testing.assert_allclose(probs_of(), (logits / TEMPERATURE).softmax(1)[0], atol=1e-5)
    np.testing.assert_allclose(probs_of("calibrated=false"), logits.softmax(1)[0], atol=1e-5)
    with torch.no_grad():
        views = [loaded.model.predict_proba(view) for view in dihedral_views(image, 2)]
    np.testing.assert_allclose(probs_of("tta=true", "tta_views=2"), torch.stack(views).mean(0)[0], atol=1e-5)
    with torch.no_grad():
        crops = [loaded.model.predict_proba(view) for view in ViewPlan(crops=5, scales=(1.25,)).views(image)]
    assert len(crops) == 5
    np.testing.assert_allclose(probs_of("tta_crops=5", "tta_scales=[1.25]"), torch.stack(crops).mean(0)[0], atol=1e-5)


def test_an_existing_output_file_is_never_replaced(tmp_path: Path, checkpoint: Path, mixed_folder: Path) -> None:
    out = tmp_path / "mine.csv"
    out.write_text("precious\n")
    with pytest.raises(ConfigError, match="already exists"):
        predict(predict_cfg(tmp_path, checkpoint, mixed_folder, f"out={out}"))
    assert out.read_text() == "precious\n"


def test_missing_input_is_a_one_line_data_error(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        predict(predict_cfg(tmp_path, checkpoint, tmp_path / "nowhere"))


def test_cli_writes_predictions_into_a_new_run_folder(tmp_path: Path, checkpoint: Path, mixed_folder: Path) -> None:
    args = [f"ckpt_path={checkpoint}", f"input={mixed_folder}", "device=cpu"]
    result = run_cli(tmp_path, "skinlesion.predict", *args, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (csv,) = (tmp_path / "outputs" / "predict" / "runs").glob("*/predictions.csv")
    assert len(pd.read_csv(csv)) == 5
    assert "notes.txt" in result.stdout  # the terminal summary names the unreadable file


def test_cli_with_crops_averages_views_but_decides_on_the_single_view(
    tmp_path: Path, trained_run: Path, mixed_folder: Path
) -> None:
    """Crops and flips change the prob_* columns; the clinical decisions stay those of one view, as fitted."""
    checkpoint = trained_run / "checkpoints" / "best.ckpt"
    images = tmp_path / "images"
    images.mkdir()
    for source in sorted(mixed_folder.glob("ISIC_*.jpg")):
        (images / source.name).write_bytes(source.read_bytes())
    args = [f"ckpt_path={checkpoint}", f"input={images}", "device=cpu", "tta=true", "tta_views=2", "tta_crops=5"]
    result = run_cli(tmp_path, "skinlesion.predict", *args, "tta_scales=[1.0,1.25]", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = (tmp_path / "outputs" / "predict" / "runs").iterdir()
    saved = json.loads((run / "predict.json").read_text())
    assert saved["tta"] == {"views": 12, "flips": 2, "crops": 5, "scales": [1.0, 1.25]} and saved["tta_views"] == 12
    with_crops = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    single = predict(predict_cfg(tmp_path / "single", checkpoint, images))
    probs = [f"prob_{c}" for c in CLASSES]
    np.testing.assert_allclose(with_crops[probs].sum(axis=1), 1.0, atol=1e-5)
    assert not np.allclose(with_crops[probs].to_numpy(), single[probs].to_numpy(), atol=1e-4)
    assert (with_crops["prediction_set"] != "").all()
    for column in DECISION_COLUMNS:
        assert list(with_crops[column].astype(str)) == list(single[column].astype(str)), column


def test_predict_reproduces_the_probabilities_of_the_validation_loader(
    trained_run: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """A user's copy of a validation image gets the probabilities training logged for it."""
    logged = pd.read_csv(trained_run / "predictions_val.csv").head(12)
    paths = load_records(synthetic_root).set_index("image_id")["path"]
    folder = tmp_path / "images"
    folder.mkdir()
    for image_id in logged["image_id"]:
        (folder / f"{image_id}.jpg").write_bytes(Path(paths[image_id]).read_bytes())
    frame = predict(predict_cfg(tmp_path, trained_run / "checkpoints" / "best.ckpt", folder))
    frame["image_id"] = frame["path"].map(lambda p: Path(p).stem)
    merged = logged.merge(frame, on="image_id", suffixes=("_logged", ""))
    assert len(merged) == len(logged)
    for name in CLASSES:
        np.testing.assert_allclose(merged[f"prob_{name}"], merged[f"prob_{name}_logged"], atol=1e-5)
