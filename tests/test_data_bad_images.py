"""Unusable image files are reported in one clear line (or skipped and listed); any mode becomes RGB."""

from __future__ import annotations

import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from skinlesion.config import CONFIG_DIR
from skinlesion.data import bad_images
from skinlesion.data.datamodule import SkinLesionDataModule
from skinlesion.data.images import ImageReadError, check_image_file, load_rgb
from skinlesion.data.metadata import MetadataSpec
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.errors import ConfigError, DataError

PRE = Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG that claims ``width`` x ``height`` pixels: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def jpeg(tmp_path: Path) -> Path:
    path = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)).save(path, quality=90)
    return path


@pytest.mark.parametrize(
    ("spoil", "reason", "when_decoded"),
    [
        (lambda p: p.unlink(), "missing file", "missing file"),
        (lambda p: p.write_bytes(b""), r"empty file \(0 bytes\)", "empty file"),
        (lambda p: p.write_text("lesion_id,image_id\n"), r"not an image \(unrecognised format\)", "not an image"),
        (lambda p: p.write_bytes(p.read_bytes()[:-400]), r"truncated file \(JPEG without", "corrupt image"),
        (lambda p: png_header_only(p, 100_000, 100_000), r"too large \(100000x100000 pixels, over", "too large"),
    ],
    ids=["missing", "empty", "not-an-image", "truncated", "decompression-bomb"],
)
def test_each_kind_of_bad_file_has_its_reason(jpeg: Path, spoil, reason: str, when_decoded: str) -> None:
    assert check_image_file(jpeg) is None
    spoil(jpeg)
    assert re.match(reason, check_image_file(jpeg) or "")
    with pytest.raises(ImageReadError, match=f"^{when_decoded}"):
        load_rgb(jpeg)


def test_max_image_pixels_is_the_users_limit(jpeg: Path) -> None:
    assert check_image_file(jpeg, max_pixels=80 * 60) is None
    assert check_image_file(jpeg, max_pixels=80 * 60 - 1).startswith("too large (80x60 pixels")


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.fromarray(np.full((4, 5), 77, np.uint8)), (77, 77, 77)),  # grayscale
        (Image.fromarray(np.full((4, 5), 257 * 200, np.uint16)), (200, 200, 200)),  # 16-bit grayscale, scaled
        (Image.new("RGBA", (5, 4), (10, 20, 30, 255)), (10, 20, 30)),  # opaque RGBA
        (Image.new("RGBA", (5, 4), (10, 20, 30, 0)), (255, 255, 255)),  # transparent: on white, not black
        (Image.new("RGB", (5, 4), (90, 60, 30)).quantize(4), (90, 60, 30)),  # palette
        (Image.new("CMYK", (5, 4), (0, 0, 0, 0)), (255, 255, 255)),
    ],
    ids=["L", "I;16", "RGBA", "RGBA-transparent", "P", "CMYK"],
)
def test_any_image_mode_becomes_rgb_uint8(tmp_path: Path, image: Image.Image, expected: tuple) -> None:
    path = tmp_path / ("image.tif" if image.mode == "CMYK" else "image.png")
    image.save(path)
    rgb = load_rgb(path)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == pytest.approx(expected, abs=1)


# ---- through the DataModule -------------------------------------------------------------------------------
@pytest.fixture
def spoiled_root(tmp_path: Path, synthetic_root: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the synthetic dataset with one file of each bad kind; returns it and image_id -> kind."""
    root = shutil.copytree(synthetic_root, tmp_path / "ham")
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    paths = {i: next(root.glob(f"*/{i}.jpg")) for i in meta["image_id"][[5, 50, 100, 150]]}
    (a, b, c, d) = paths
    paths[a].unlink()
    paths[b].write_bytes(b"")
    paths[c].write_text("not a jpeg")
    paths[d].write_bytes(paths[d].read_bytes()[:200])
    return root, {a: "missing file", b: "empty file", c: "not an image", d: "truncated file"}


def datamodule(root: Path, tmp_path: Path, **settings) -> SkinLesionDataModule:
    settings = {"cache": {"enabled": False}, "num_workers": 0, **settings}
    return SkinLesionDataModule(str(root), preprocessing=PRE, output_dir=str(tmp_path / "run"), **settings)


def test_bad_images_stop_the_run_with_one_line_naming_file_lines_and_kinds(spoiled_root, tmp_path: Path) -> None:
    root, kinds = spoiled_root
    with pytest.raises(DataError) as err:
        datamodule(root, tmp_path).setup()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{root / 'HAM10000_metadata.csv'}: 4 of 420 listed images are unusable (")
    for kind in kinds.values():
        assert f"{kind}: 1" in message
    assert "line 7 " in message  # row 5 of the table is line 7 of the file
    assert "data.on_bad_image=skip" in message
    listed = pd.read_csv(tmp_path / "run" / "bad_images.csv")
    assert f"the full list is in {tmp_path / 'run' / 'bad_images.csv'}" in message
    assert dict(zip(listed["image_id"], listed["reason"].str.split(" (", regex=False).str[0])) == kinds


def test_skip_drops_and_records_what_it_skipped(spoiled_root, tmp_path: Path, caplog) -> None:
    root, kinds = spoiled_root
    dm = datamodule(root, tmp_path, on_bad_image="skip")
    dm.setup()
    assert len(dm.records) == 416 and not dm.records["image_id"].isin(list(kinds)).any()
    skipped = pd.read_csv(tmp_path / "run" / "skipped_images.csv")
    assert set(skipped["image_id"]) == set(kinds)
    assert {"image_id", "source_row", "path", "reason", "dataset"} <= set(skipped.columns)
    assert "4 of 420 listed images are unusable" in caplog.text and "Skipping them" in caplog.text
    assert len(pd.read_csv(tmp_path / "run" / "split.csv")) == 416


def test_metadata_rows_stay_with_their_images_when_bad_ones_are_skipped(spoiled_root, tmp_path: Path) -> None:
    """The metadata model's vectors are encoded per split after the skipped rows are gone: by image, not by row."""
    root, kinds = spoiled_root
    fusion = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "metadata" / "fusion.yaml"))["module"]["metadata"]
    spec = MetadataSpec.from_config(fusion)
    dm = datamodule(root, tmp_path, on_bad_image="skip", metadata=spec)
    dm.setup()
    table = pd.read_csv(root / "HAM10000_metadata.csv", dtype=str, keep_default_na=False).set_index("image_id")
    for name, dataset in dm.datasets.items():
        ids = [Path(path).stem for path in dataset.paths]
        assert not set(ids) & set(kinds), name
        assert np.array_equal(dataset.metadata, spec.encode(table.loc[ids].reset_index())), name
    item = dm.datasets["val"][3]
    assert torch.equal(
        item["metadata"], torch.from_numpy(spec.encode(table.loc[[Path(dm.datasets["val"].paths[3]).stem]])[0])
    )
    assert len(np.unique(dm.datasets["train"].metadata, axis=0)) > 10  # rows that differ: a shift would show


def test_a_file_that_passes_the_cheap_check_but_fails_to_decode_is_caught_by_the_cache(
    spoiled_root, tmp_path: Path, monkeypatch
) -> None:
    root, kinds = spoiled_root
    monkeypatch.setattr(bad_images, "check_image_file", lambda path, max_pixels: None)  # let everything through
    cache = {"enabled": True, "dir": str(tmp_path / "cache")}
    with pytest.raises(DataError, match=r"4 of 420 listed images are unusable \(") as err:
        datamodule(root, tmp_path, cache=cache).setup()
    assert "missing file: 1" in str(err.value) and "truncated file: 1" in str(err.value)
    dm = datamodule(root, tmp_path, cache=cache, on_bad_image="skip")
    dm.setup()
    assert len(dm.records) == 416 and set(dm.skipped["image_id"]) == set(kinds)
    assert dm.records["cache_row"].is_unique  # every kept record points at its own decoded image


def test_skip_reports_each_bad_file_once_when_the_cache_finds_more(
    spoiled_root, tmp_path: Path, monkeypatch, caplog
) -> None:
    root, kinds = spoiled_root
    truncated = next(i for i, kind in kinds.items() if kind == "truncated file")
    real_check = bad_images.check_image_file

    def misses_the_truncated_file(path, max_pixels):  # the cheap check misses it; only decoding it finds out
        return None if truncated in path else real_check(path, max_pixels)

    monkeypatch.setattr(bad_images, "check_image_file", misses_the_truncated_file)
    dm = datamodule(root, tmp_path, cache={"enabled": True, "dir": str(tmp_path / "cache")}, on_bad_image="skip")
    dm.setup()
    warnings = [r.getMessage() for r in caplog.records if "Skipping them" in r.getMessage()]
    assert len(warnings) == 2
    assert "3 of 420 listed images are unusable" in warnings[0] and truncated not in warnings[0]
    assert "1 of 417 listed images are unusable (truncated file: 1)" in warnings[1]
    assert set(dm.skipped["image_id"]) == set(kinds) and len(dm.records) == 416


def test_an_error_stops_before_any_decoding(spoiled_root, tmp_path: Path) -> None:
    root, _ = spoiled_root
    with pytest.raises(DataError):
        datamodule(root, tmp_path, cache={"enabled": True, "dir": str(tmp_path / "cache")}).setup()
    assert not (tmp_path / "cache").exists()


def test_no_image_found_at_all_points_at_the_root_and_all_unusable_is_an_empty_dataset(
    synthetic_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "ham"
    root.mkdir()
    shutil.copy(synthetic_root / "HAM10000_metadata.csv", root)
    with pytest.raises(
        DataError, match=r"none of the 420 listed images was found .*\(e.g. .*ham/ISIC_\d+.jpg\); check"
    ):
        datamodule(root, tmp_path, on_bad_image="skip").setup()
    for image_id in pd.read_csv(root / "HAM10000_metadata.csv")["image_id"]:
        (root / f"{image_id}.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"the dataset is empty: all 420 listed images are unusable"):
        datamodule(root, tmp_path, on_bad_image="skip").setup()


def test_too_few_lesions_for_the_folds_names_the_classes(synthetic_root: Path, tmp_path: Path) -> None:
    dm = datamodule(synthetic_root, tmp_path, split={"num_folds": 12, "fold": 0})
    with pytest.raises(DataError, match=r"too few lesions per class for data.split.num_folds=12 .*df has \d+"):
        dm.setup()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"on_bad_image": "ignore"}, "data.on_bad_image='ignore' is not valid; choose one of error, skip"),
        ({"class_weights": "inverse"}, "data.class_weights='inverse' is not valid"),
        ({"split": {"strategy": "random"}}, "unknown data.split.strategy 'random'"),
        ({"test_set": {"layout": "isic2018"}}, "data.test_set needs a root"),
        ({"image_size": 64}, "data.image_size=64 differs from the model's input size 32"),
    ],
)
def test_invalid_settings_fail_at_construction(tmp_path: Path, setting: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        datamodule(tmp_path / "not-read", tmp_path, **setting)
