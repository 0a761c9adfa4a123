"""The embedded synthetic dataset looks like the HAM10000 download and can be learned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinlesion.data import synthetic
from skinlesion.labels import CLASSES
from skinlesion.train import train

from conftest import FROM_SCRATCH, compose_config, tiny_train_overrides

# The Dataverse release (and the real subset here) adds "dataset", the source clinic and device, at the end.
HAM_COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]


@pytest.fixture(scope="module")
def full_size(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("syn") / "ham", n_images=90, seed=3, min_lesions_per_class=2)


def test_layout_columns_and_images_match_the_kaggle_download(full_size: Path) -> None:
    meta = pd.read_csv(full_size / "HAM10000_metadata.csv")
    assert list(meta.columns) == HAM_COLUMNS
    assert set(meta["dx"]) == set(CLASSES)
    assert meta["image_id"].str.fullmatch(r"ISIC_\d{7}").all()
    parts = {p.parent.name for p in full_size.glob("HAM10000_images_part_*/*.jpg")}
    assert parts == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    paths = {p.stem: p for p in full_size.glob("*/*.jpg")}
    assert set(paths) == set(meta["image_id"])
    with Image.open(paths[meta["image_id"][0]]) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (600, 450))
    # Several photos of some lesions, and every photo of a lesion shares its diagnosis and patient.
    per_lesion = meta.groupby("lesion_id")
    assert (per_lesion.size() > 1).any()
    assert (per_lesion[["dx", "sex", "localization"]].nunique() == 1).all().all()


def test_generation_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = synthetic.generate(tmp_path / "a", n_images=40, seed=7, width=80, height=60, min_lesions_per_class=2)
    b = synthetic.generate(tmp_path / "b", n_images=40, seed=7, width=80, height=60, min_lesions_per_class=2)
    c = synthetic.generate(tmp_path / "c", n_images=40, seed=8, width=80, height=60, min_lesions_per_class=2)
    meta_a, meta_b = (pd.read_csv(p / "HAM10000_metadata.csv") for p in (a, b))
    pd.testing.assert_frame_equal(meta_a, meta_b)
    for image_id in meta_a["image_id"][:5]:
        pixels = [np.asarray(Image.open(next(root.glob(f"*/{image_id}.jpg")))) for root in (a, b)]
        np.testing.assert_array_equal(*pixels)
    assert not pd.read_csv(c / "HAM10000_metadata.csv")["lesion_id"].equals(meta_a["lesion_id"])


def test_class_proportions_follow_ham10000() -> None:
    counts = synthetic.class_counts(10015, min_lesions_per_class=8)
    assert counts == synthetic.HAM_IMAGE_COUNTS
    plan = synthetic.plan_lesions(3000, seed=0, min_lesions_per_class=8)
    images = pd.Series({dx: 0 for dx in CLASSES})
    for lesion, n_photos in plan:
        images[lesion.dx] += n_photos
    share = images / images.sum()
    assert share["nv"] == pytest.approx(6705 / 10015, abs=0.01)
    assert share["df"] == pytest.approx(115 / 10015, abs=0.005)
    assert 1.2 < images.sum() / len(plan) < 1.5  # HAM10000: 10,015 images of 7,470 lesions


def test_refuses_to_write_over_an_existing_dataset(full_size: Path) -> None:
    with pytest.raises(FileExistsError):
        synthetic.generate(full_size, n_images=90)


def test_a_folder_holding_files_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my own file")
    with pytest.raises(FileExistsError, match="already holds files"):
        synthetic.generate(folder, n_images=20, min_lesions_per_class=1)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no .partial folder either


def test_a_failed_generation_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = []

    def fails_part_way(lesion, photo, width, height):
        if len(drawn) == 5:
            raise OSError("disk full")
        drawn.append(photo)
        return render(lesion, photo, width, height)

    render = synthetic.render_lesion
    monkeypatch.setattr(synthetic, "render_lesion", fails_part_way)
    with pytest.raises(OSError, match="disk full"):
        synthetic.generate(tmp_path / "ham", n_images=20, width=32, height=24, min_lesions_per_class=1, num_workers=1)
    assert list(tmp_path.iterdir()) == []


def test_only_training_generates_a_missing_synthetic_set(tmp_path: Path) -> None:
    """Evaluate, explain, check-data and a resume read the set; a moved root must not be replaced by a new one."""
    params = {"n_images": 20, "seed": 4, "min_lesions_per_class": 1}
    with pytest.raises(FileNotFoundError, match=r"only training generates one.*skinlesion.data.synthetic out="):
        synthetic.require_dataset(tmp_path / "moved", params)
    assert list(tmp_path.iterdir()) == []
    synthetic.ensure_dataset(tmp_path / "moved", **params, width=32, height=24)
    synthetic.require_dataset(tmp_path / "moved", params)  # now it is there


def test_cli_writes_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    args = [f"out={out}", "n_images=30", "seed=1", "width=64", "height=48", "min_lesions_per_class=1"]
    assert synthetic.main(args) == 0
    assert len(pd.read_csv(out / "HAM10000_metadata.csv")) == 30
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["n_images=10"])  # no out=
    assert exit_info.value.code == 2
    assert "error: missing out; usage" in capsys.readouterr().err


@pytest.mark.slow
def test_a_small_model_learns_it_far_above_chance(tmp_path: Path, synthetic_root: Path, cache_dir: Path) -> None:
    """Seven classes: chance balanced accuracy is 1/7 = 0.14; a few CPU epochs must reach well above it."""
    cfg = compose_config(
        "train",
        [
            *tiny_train_overrides(tmp_path, synthetic_root, cache_dir),
            "data.image_size=48",
            "trainer.max_epochs=6",
            *FROM_SCRATCH,
        ],
    )
    metrics = train(cfg).metrics
    assert metrics["test/balanced_acc"] > 2 / 7  # twice chance; the small test split makes it vary by machine
    assert metrics["test/auroc_macro"] > 0.75
