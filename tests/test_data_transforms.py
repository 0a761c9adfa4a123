"""Pipelines use the backbone's own size/mean/std/interpolation; every augmentation can be switched off."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest
import timm
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from skinlesion.data.dataset import LesionDataset
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.data.transforms import (
    LUMA,
    RandomAffineResize,
    RandomColorJitter,
    colour_matrix,
    eval_transform,
    train_transform,
)
from skinlesion.errors import ConfigError

ALL_ON = {"rotate": 90, "zoom": 0.1, "shift": 0.1, "brightness": 0.1, "contrast": 0.1, "hflip": True, "vflip": True}
ALL_ON |= {"hue": 0.02, "saturation": 0.1}
ALL_OFF = dict.fromkeys(ALL_ON, 0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """An asymmetric test card: flips and rotations all change it."""
    card = np.full((90, 120, 3), 128, np.uint8)
    card[:45, :60] = (220, 40, 40)
    card[45:, 80:] = (40, 200, 60)
    card[10:30, 90:110] = (30, 30, 230)
    return card


def test_inception_v3_gets_299_px_and_mean_std_half_from_timm_and_image_size_overrides_only_the_size(
    train_cfg,
) -> None:
    cfg = train_cfg("model=inception_v3", "data.image_size=96")
    module = instantiate(cfg.module)  # the backbone's preprocessing, as training builds it
    assert module.preprocessing.image_size == 96
    assert module.preprocessing.mean == (0.5, 0.5, 0.5) and module.preprocessing.std == (0.5, 0.5, 0.5)
    native = Preprocessing.from_model(module.backbone)  # timm's data config, no override
    assert (native.image_size, native.mean, native.std) == (299, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert native.interpolation == "bicubic" and native.cv2_interpolation == cv2.INTER_CUBIC
    assert native.resize_size == round(299 / 0.875)
    picture = np.zeros((450, 600, 3), np.uint8)
    assert train_transform(native, ALL_ON)(image=picture)["image"].shape == (299, 299, 3)
    assert eval_transform(native)(image=picture)["image"].shape == (299, 299, 3)
    assert eval_transform(native, center_crop=True)(image=picture)["image"].shape == (299, 299, 3)
    datamodule = instantiate(cfg.data, preprocessing=module.preprocessing)
    datamodule.setup()
    assert next(iter(datamodule.train_dataloader()))["image"].shape[1:] == (3, 96, 96)
    assert datamodule.image_cache_size == round(96 / 0.875)


def test_imagenet_backbones_get_imagenet_statistics_from_timm() -> None:
    resnet = Preprocessing.from_model(timm.create_model("resnet50.a1_in1k", pretrained=False))
    assert (resnet.image_size, resnet.mean, resnet.std) == (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert resnet.crop_pct == 0.95 and resnet.resize_size == 236


def test_each_augmentation_is_configurable_and_switchable_off(image: np.ndarray) -> None:
    pre = Preprocessing(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    names = lambda augment: [type(t).__name__ for t in train_transform(pre, augment).transforms]  # noqa: E731
    assert names(ALL_ON) == ["RandomAffineResize", "RandomColorJitter"]
    assert names(ALL_OFF) == ["Resize"]
    assert names({**ALL_OFF, "vflip": True}) == ["RandomAffineResize"]
    assert names({**ALL_OFF, "contrast": 0.2}) == ["Resize", "RandomColorJitter"]
    geometry, colour = train_transform(pre, {**ALL_ON, "rotate": 0, "hue": 0}).transforms
    assert (geometry.rotate, geometry.zoom, geometry.shift, geometry.hflip) == (0, 0.1, 0.1, True)
    assert (colour.brightness, colour.contrast, colour.saturation, colour.hue) == (0.1, 0.1, 0.1, 0)
    # All off: training sees exactly what evaluation sees.
    off = train_transform(pre, ALL_OFF)(image=image)["image"]
    assert np.array_equal(off, eval_transform(pre)(image=image)["image"])
    with pytest.raises(ConfigError, match=r"unknown data.augment key\(s\) blur"):
        train_transform(pre, {"blur": 3})


def test_the_fused_warp_is_a_plain_resize_without_augmentation_and_flips_exactly(image: np.ndarray) -> None:
    resized = cv2.resize(image, (64, 64), interpolation=cv2.INTER_LINEAR)
    warp = RandomAffineResize(64)(image=image)["image"]
    assert np.abs(warp.astype(int) - resized).max() <= 1
    flips = A.Compose([RandomAffineResize(64, hflip=True, vflip=True)], seed=0)
    seen = {flips(image=image)["image"].tobytes() for _ in range(40)}
    expected = {np.ascontiguousarray(f).tobytes() for f in (warp, warp[:, ::-1], warp[::-1], warp[::-1, ::-1])}
    assert seen == expected  # all four flip combinations, and nothing else


def test_geometry_augmentation_moves_the_content(image: np.ndarray) -> None:
    plain = RandomAffineResize(64)(image=image)["image"]
    moved = A.Compose([RandomAffineResize(64, rotate=90, zoom=0.1, shift=0.1)], seed=1)
    outputs = [moved(image=image)["image"] for _ in range(5)]
    assert all(np.abs(o.astype(int) - plain).mean() > 5 for o in outputs)
    assert all((o.reshape(-1, 3) > 20).any(axis=1).all() for o in outputs)  # borders mirrored: no black corners


def test_colour_matrix_is_identity_at_rest_and_moves_hue_saturation_contrast_brightness_as_named() -> None:
    rgb = lambda pixel, *factors: cv2.transform(np.array([[pixel]], np.uint8), colour_matrix(*factors))[0, 0]  # noqa: E731
    assert tuple(rgb((200, 40, 90), 1, 1, 1, 0, 0)) == (200, 40, 90)
    assert tuple(rgb((255, 0, 0), 1, 1, 1, 1 / 3, 0)) == (0, 255, 0)  # a third of a turn: red becomes green
    grey = round(float(LUMA @ (200, 40, 90)))
    assert tuple(rgb((200, 40, 90), 1, 1, 0, 0, 0)) == (grey,) * 3  # no saturation: the pixel's luma
    assert tuple(rgb((200, 40, 90), 1, 0, 1, 0, 117)) == (117,) * 3  # no contrast: the image mean
    assert tuple(rgb((100, 40, 250), 1.2, 1, 1, 0, 0)) == (120, 48, 255)  # brighter, saturating at 255


def test_colour_jitter_keeps_the_image_close_and_random(image: np.ndarray) -> None:
    jitter = A.Compose([RandomColorJitter(0.1, 0.1, 0.1, 0.02)], seed=0)
    outputs = [jitter(image=image)["image"] for _ in range(6)]
    assert len({o.tobytes() for o in outputs}) == 6
    assert all(0 < np.abs(o.astype(int) - image).mean() < 30 for o in outputs)


def test_each_worker_draws_its_own_augmentation_and_the_seed_repeats_them(image: np.ndarray, tmp_path) -> None:
    pre = Preprocessing(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    cache = np.repeat(image[None], 8, axis=0)  # eight copies of the same picture

    def batches(workers: int, seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        dataset = LesionDataset([""] * 8, [0] * 8, range(8), train_transform(pre, ALL_ON), cache, range(8))
        loader = DataLoader(dataset, batch_size=1, num_workers=workers)
        return [b["image"][0] for b in loader]

    two_workers = batches(2, seed=0)
    assert not torch.equal(two_workers[0], two_workers[1])  # items 0 and 1 come from different workers
    assert all(torch.equal(a, b) for a, b in zip(two_workers, batches(2, seed=0)))
    in_process = batches(0, seed=3)
    assert len({t.numpy().tobytes() for t in in_process}) == 8
    assert all(torch.equal(a, b) for a, b in zip(in_process, batches(0, seed=3)))


@pytest.mark.parametrize("crop_pct", [0.875, 0.95])  # most backbones; ResNet-50 (a1_in1k)
@pytest.mark.parametrize("source_side", [None, 300])  # the cache's side: image_size / crop_pct, or data.cache.size
def test_centre_crop_gives_training_without_augmentation_the_pixels_evaluation_sees(
    image: np.ndarray, crop_pct: float, source_side: int | None
) -> None:
    pre = Preprocessing(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=crop_pct)
    side = source_side or pre.resize_size
    cached = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
    seen_in_eval = eval_transform(pre, center_crop=True)(image=cached)["image"]
    seen_in_training = train_transform(pre, ALL_OFF, center_crop=True)(image=cached)["image"]
    np.testing.assert_array_equal(seen_in_training, seen_in_eval)
    flipped = train_transform(pre, ALL_OFF | {"hflip": True}, center_crop=True)
    views = [flipped(image=cached)["image"] for _ in range(8)]  # the same crop, mirrored or not
    assert all(np.array_equal(v, seen_in_eval) or np.array_equal(v, seen_in_eval[:, ::-1]) for v in views)
