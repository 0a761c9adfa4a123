"""Albumentations pipelines built from the backbone's preprocessing and the ``data.augment`` settings.

Pipelines end in uint8 HxWx3 arrays: normalisation with the backbone's mean/std happens on the device
(:meth:`SkinLesionClassifier.normalize`), which moves a quarter of the bytes a float batch would and
keeps float work out of the loader workers.

Training augmentation is two Albumentations transforms of this module, each one OpenCV call per image:
:class:`RandomAffineResize` (resize, rotation, zoom, shift and both flips in one ``cv2.warpAffine``)
and :class:`RandomColorJitter` (brightness, contrast, saturation and hue as one 3x4 colour matrix in
``cv2.transform``). Measured on 236 px cache images, they replace Resize + Affine + two flips (0.93 ms)
by 0.33 ms, and RandomBrightnessContrast + HueSaturationValue (0.24 ms, two HSV conversions) by 0.04 ms:
the cached path's CPU time per training image halves (``python -m skinlesion.bench data``).

The ISIC leaders' augmentations follow, each off unless set: hair-like artefacts (:class:`RandomHair`),
torchvision's RandAugment or TrivialAugmentWide on the uint8 image (:class:`TorchvisionAugment`), and
Albumentations' ``Erasing`` last, as timm's RandomErasing. (Mixup and CutMix mix whole batches on the device:
:mod:`skinlesion.models.mixing`.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from torchvision.transforms import v2

from skinlesion.data.preprocessing import Preprocessing
from skinlesion.data.specs import AugmentSpec


class RandomAffineResize(A.ImageOnlyTransform):
    """Resize to ``size`` x ``size`` while rotating (+-``rotate`` degrees), zooming (x and y each by
    1+-``zoom``, as Keras' ``zoom_range``), shifting (+-``shift`` of the side) and flipping each axis
    with probability 0.5, all in one warp; borders are mirrored, so no black corners appear.

    Interpolation is bilinear: the input is the cached (or equally pre-resized) image, only slightly
    larger than ``size``, so no antialiasing is needed.
    """

    def __init__(
        self,
        size: int,
        rotate: float = 0.0,
        zoom: float = 0.0,
        shift: float = 0.0,
        hflip: bool = False,
        vflip: bool = False,
        interpolation: int = cv2.INTER_LINEAR,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.size, self.rotate, self.zoom, self.shift = int(size), float(rotate), float(zoom), float(shift)
        self.hflip, self.vflip, self.interpolation = bool(hflip), bool(vflip), interpolation

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        rnd = self.py_random
        angle = math.radians(rnd.uniform(-self.rotate, self.rotate))
        flip_x = -1.0 if self.hflip and rnd.random() < 0.5 else 1.0
        flip_y = -1.0 if self.vflip and rnd.random() < 0.5 else 1.0
        scale_x = flip_x * rnd.uniform(1 - self.zoom, 1 + self.zoom) * self.size / width
        scale_y = flip_y * rnd.uniform(1 - self.zoom, 1 + self.zoom) * self.size / height
        shift_x, shift_y = (rnd.uniform(-self.shift, self.shift) * self.size for _ in range(2))
        cos, sin = math.cos(angle), math.sin(angle)
        linear = np.array([[cos, -sin], [sin, cos]]) @ np.diag([scale_x, scale_y])
        # Pixel centres: output centre + shift = linear @ (input - input centre).
        centre_in = np.array([(width - 1) / 2, (height - 1) / 2])
        centre_out = (self.size - 1) / 2 + np.array([shift_x, shift_y])
        matrix = np.hstack([linear, (centre_out - linear @ centre_in)[:, None]])
        return {"matrix": matrix}

    def apply(self, img: np.ndarray, matrix: np.ndarray, **params: Any) -> np.ndarray:
        if img.ndim == 3 and img.shape[2] == 3:
            # OpenCV warps 4-channel images on its vectorised path: padding to RGBA and dropping the pad
            # afterwards costs 0.23 ms per 236 px image on one core, against 0.35 ms for warping RGB.
            rgba = cv2.cvtColor(img, cv2.COLOR_RGB2RGBA)
            warped = cv2.warpAffine(
                rgba, matrix, (self.size, self.size), flags=self.interpolation, borderMode=cv2.BORDER_REFLECT_101
            )
            return cv2.cvtColor(warped, cv2.COLOR_RGBA2RGB)
        return cv2.warpAffine(
            img, matrix, (self.size, self.size), flags=self.interpolation, borderMode=cv2.BORDER_REFLECT_101
        )

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "rotate", "zoom", "shift", "hflip", "vflip", "interpolation")


LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 weights of R, G, B (RGB order throughout)


def colour_matrix(brightness: float, contrast: float, saturation: float, hue: float, mean: float) -> np.ndarray:
    """3x4 matrix for ``cv2.transform``: rotate hue by ``hue`` of a full turn (about the grey axis),
    scale saturation about the pixel's luma, contrast about the image's ``mean`` luma, then brightness;
    factors as torchvision's ``ColorJitter`` (1 = unchanged)."""
    angle = 2 * math.pi * hue
    axis = np.ones(3) / math.sqrt(3)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = math.cos(angle) * np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * np.outer(axis, axis)
    desaturate = saturation * np.eye(3) + (1 - saturation) * np.outer(np.ones(3), LUMA)
    linear = brightness * contrast * desaturate @ rotation
    offset = brightness * (1 - contrast) * mean * np.ones(3)
    return np.hstack([linear, offset[:, None]]).astype(np.float32)


class RandomColorJitter(A.ImageOnlyTransform):
    """Brightness, contrast and saturation factors drawn from 1+-x and a hue shift from +-x of a full
    turn (torchvision's ``ColorJitter`` ranges), applied together as one colour matrix."""

    def __init__(
        self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0, p: float = 1.0
    ) -> None:
        super().__init__(p=p)
        self.brightness, self.contrast, self.saturation, self.hue = map(float, (brightness, contrast, saturation, hue))

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        rnd = self.py_random
        factors = [rnd.uniform(1 - x, 1 + x) for x in (self.brightness, self.contrast, self.saturation)]
        mean = float(LUMA @ np.asarray(cv2.mean(data["image"])[:3])) if self.contrast else 0.0
        return {"matrix": colour_matrix(*factors, rnd.uniform(-self.hue, self.hue), mean)}

    def apply(self, img: np.ndarray, matrix: np.ndarray, **params: Any) -> np.ndarray:
        return cv2.transform(img, matrix)  # saturates to 0..255

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness", "contrast", "saturation", "hue")


class RandomHair(A.ImageOnlyTransform):
    """1-6 thin dark curves (quadratic Bezier, anti-aliased, 1-2 px at 224 px), as hairs cross dermoscopy
    photos: the model should not read them as lesion structure."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p=p)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        rnd = self.random_generator
        side = min(height, width)
        curves = []
        for _ in range(int(rnd.integers(1, 7))):
            start = rnd.uniform((0, 0), (width, height))
            angle = rnd.uniform(0, 2 * math.pi)
            end = start + rnd.uniform(0.3, 0.9) * side * np.array([math.cos(angle), math.sin(angle)])
            bend = (start + end) / 2 + rnd.normal(0, 0.15 * side, 2)
            t = np.linspace(0, 1, 24)[:, None]
            points = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end
            colour = tuple(float(c) for c in rnd.uniform(10, 60) * np.array([1.0, 0.8, 0.7]))  # dark brown-black
            thickness = max(1, round(rnd.uniform(1, 2) * side / 224))
            curves.append((np.round(points).astype(np.int32), colour, thickness))
        return {"curves": curves}

    def apply(self, img: np.ndarray, curves: list, **params: Any) -> np.ndarray:
        img = img.copy()
        for points, colour, thickness in curves:
            cv2.polylines(img, [points], False, colour, thickness, lineType=cv2.LINE_AA)
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ()


class TorchvisionAugment(A.ImageOnlyTransform):
    """torchvision's RandAugment (``magnitude`` > 0, two ops) or TrivialAugmentWide on the uint8 image.

    torchvision draws from torch's global generator; each image's draw is seeded from this transform's own
    generator instead (in a forked copy of torch's state), so it follows the pipeline's seed as the
    Albumentations transforms do (:class:`skinlesion.data.dataset.LesionDataset`)."""

    def __init__(self, magnitude: float = 0.0, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.magnitude = float(magnitude)
        self.op = v2.RandAugment(num_ops=2, magnitude=int(magnitude)) if magnitude else v2.TrivialAugmentWide()

    def get_params(self) -> dict[str, Any]:
        return {"seed": self.py_random.getrandbits(63)}

    def apply(self, img: np.ndarray, seed: int, **params: Any) -> np.ndarray:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed costs 0.3 ms
            out = self.op(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
        return np.ascontiguousarray(out.permute(1, 2, 0).numpy())

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("magnitude",)


def train_transform(pre: Preprocessing, augment: AugmentSpec | Mapping | None, center_crop: bool = False) -> A.Compose:
    """The original project's rotation/zoom/shift/brightness plus flips and colour jitter; 0/false = off.

    ``center_crop``: augmentation starts from the central crop evaluation sees (:func:`centre_crop`), so
    training and evaluation show the model the same field of view; augmentation off, the same pixels.
    """
    aug = AugmentSpec.from_config(augment)
    geometry = {"rotate": aug.rotate, "zoom": aug.zoom, "shift": aug.shift}
    flips = {"hflip": aug.hflip, "vflip": aug.vflip}
    steps: list = centre_crop(pre) if center_crop else []
    if any(geometry.values()) or any(flips.values()):
        steps.append(RandomAffineResize(pre.image_size, **geometry, **flips))
    elif not center_crop:  # the crop is already image_size
        steps.append(_resize(pre, pre.image_size))
    colour = {"brightness": aug.brightness, "contrast": aug.contrast, "saturation": aug.saturation, "hue": aug.hue}
    if aug.hair:  # before the colour changes, which then tint the hairs too
        steps.append(RandomHair(p=aug.hair))
    if any(colour.values()):
        steps.append(RandomColorJitter(**colour))
    if aug.randaugment or aug.trivial_augment:
        steps.append(TorchvisionAugment(aug.randaugment))
    if aug.erase:
        steps.append(A.Erasing(scale=(0.02, 0.33), ratio=(0.3, 3.3), fill="random", p=aug.erase))
    return A.Compose(steps)


def eval_transform(pre: Preprocessing, center_crop: bool = False) -> A.Compose:
    """Resize only, or timm's resize-then-centre-crop when ``center_crop`` (lesions sit in the centre)."""
    return A.Compose(centre_crop(pre) if center_crop else [_resize(pre, pre.image_size)])


def centre_crop(pre: Preprocessing) -> list[A.BasicTransform]:
    """timm's eval view: resize to ``image_size / crop_pct``, keep the central ``image_size`` square (the
    central 87.5% of the image for most backbones, 95% for ResNet-50)."""
    return [_resize(pre, pre.resize_size), A.CenterCrop(pre.image_size, pre.image_size)]


def _resize(pre: Preprocessing, side: int) -> A.Resize:
    """The backbone's interpolation when enlarging, area averaging when shrinking (as the cache does):
    OpenCV's bicubic does not antialias, so shrinking a 600x450 photo with it would alias fine texture."""
    return A.Resize(side, side, interpolation=pre.cv2_interpolation, area_for_downscale="image")
