"""The decoded-image cache is built once, reused, rebuilt when a file changes, and holds the same pixels."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from skinlesion.data import cache as cache_module
from skinlesion.data.cache import open_or_build_cache
from skinlesion.data.datamodule import SkinLesionDataModule
from skinlesion.data.images import load_resized, load_rgb
from skinlesion.data.preprocessing import Preprocessing

PRE = Preprocessing(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture
def files(tmp_path: Path, synthetic_root: Path) -> list[str]:
    """Twelve real (synthetic 120x90) JPEGs, copied so that the test may change them."""
    folder = tmp_path / "images"
    folder.mkdir()
    sources = sorted(synthetic_root.glob("*/*.jpg"))[:12]
    return [str(shutil.copy(p, folder / p.name)) for p in sources]


def test_built_once_reused_then_rebuilt_when_a_file_changes(files: list[str], tmp_path: Path) -> None:
    first = open_or_build_cache(files, 40, tmp_path / "cache")
    assert first.built and first.array.shape == (12, 40, 40, 3)
    written = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(written) == 2  # the data and its metadata, no temporary files left

    again = open_or_build_cache(files, 40, tmp_path / "cache")
    assert not again.built and again.path == first.path
    assert np.array_equal(again.array, first.array)

    Image.fromarray(np.full((90, 120, 3), (10, 200, 30), np.uint8)).save(files[3])  # new pixels, new mtime
    os.utime(files[3], ns=(os.stat(files[3]).st_atime_ns, os.stat(files[3]).st_mtime_ns + 10**9))
    rebuilt = open_or_build_cache(files, 40, tmp_path / "cache")
    assert rebuilt.built and rebuilt.path != first.path
    assert tuple(rebuilt[3][20, 20]) == pytest.approx((10, 200, 30), abs=3)
    assert np.array_equal(rebuilt[4], first.array[4])
    assert not first.path.exists()  # the stale cache of the same file list is removed
    assert len(list((tmp_path / "cache").iterdir())) == 2

    other_size = open_or_build_cache(files, 48, tmp_path / "cache")
    assert other_size.built and rebuilt.path.exists()  # another size is another cache, kept side by side


def test_same_pixels_as_decoding_the_file(files: list[str], tmp_path: Path) -> None:
    cached = open_or_build_cache(files, 40, tmp_path / "cache", cv2.INTER_CUBIC)
    for i, path in enumerate(files):
        assert np.array_equal(cached[i], load_resized(path, 40, cv2.INTER_CUBIC))  # what the plain path decodes
        independent = np.asarray(Image.open(path).convert("RGB").resize((40, 40), Image.Resampling.BOX))
        assert np.abs(cached[i].astype(int) - independent).mean() < 2.0  # PIL's own area resize


def test_an_interrupted_build_leaves_nothing_that_looks_like_a_cache(files, tmp_path: Path, monkeypatch) -> None:
    calls = []

    def failing(path, *args):
        calls.append(path)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return load_resized(path, *args)

    monkeypatch.setattr(cache_module, "load_resized", failing)
    with pytest.raises(KeyboardInterrupt):
        open_or_build_cache(files, 40, tmp_path / "cache", threads=1)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    assert open_or_build_cache(files, 40, tmp_path / "cache").built


def test_workers_map_the_cache_instead_of_receiving_a_copy(files: list[str], tmp_path: Path) -> None:
    cached = open_or_build_cache(files, 40, tmp_path / "cache")
    _ = cached.array  # opened in this process
    restored = pickle.loads(pickle.dumps(cached))
    assert len(pickle.dumps(cached)) < 2_000 < cached.array.nbytes
    assert np.array_equal(restored[5], cached[5])


def test_cache_and_plain_paths_feed_the_model_the_same_pixels(synthetic_root: Path, cache_dir: Path) -> None:
    def first_batch(cache: dict) -> tuple[SkinLesionDataModule, dict]:
        dm = SkinLesionDataModule(str(synthetic_root), cache=cache, preprocessing=PRE, num_workers=0)
        dm.setup()
        return dm, next(iter(dm.eval_dataloader("val")))

    dm, cached = first_batch({"enabled": True, "dir": str(cache_dir)})
    _, plain = first_batch({"enabled": False})
    assert cached["image"].dtype == plain["image"].dtype == torch.uint8
    assert cached["index"].tolist() == plain["index"].tolist()
    assert (cached["image"].int() - plain["image"].int()).abs().max() <= 1
    for image, index in zip(cached["image"][:4], cached["index"][:4]):  # against one direct resize of the file
        direct = cv2.resize(load_rgb(dm.records.loc[int(index), "path"]), (32, 32), interpolation=cv2.INTER_AREA)
        assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - direct).mean() < 3.0
