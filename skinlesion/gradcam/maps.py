"""Class-activation heatmaps (pytorch-grad-cam) for every backbone, mapped back onto the original image.

The target layer is each backbone's last spatial feature map, named in its model config
(``model.gradcam_layer``): resnet50 ``layer4``, densenet121 ``features.norm5`` (BN + ReLU after the last
dense block), mobilenetv2 and efficientnet_b0 ``bn2`` (the head conv's BN + activation) and inception_v3
``Mixed_7c``; each is the input of the global pooling before the classifier. Grad-CAM and Grad-CAM++
explain the predicted class; EigenCAM (the first principal component of that feature map) is
class-agnostic and needs no gradients. The heatmap is computed at the model's input and mapped back
through the eval transform onto the original image, so a non-square photo is shown undistorted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import cv2
import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from skinlesion.data.preprocessing import Preprocessing
from skinlesion.errors import ConfigError
from skinlesion.models.module import SkinLesionClassifier

log = logging.getLogger(__name__)

CAM_METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}


def check_method(method: str, setting: str = "method") -> str:
    if method not in CAM_METHODS:
        raise ConfigError(f"{setting}={method} is not supported; choose one of {', '.join(CAM_METHODS)}")
    return method


@contextmanager
def _gradients_to_input_only(model: torch.nn.Module) -> Iterator[None]:
    """Gradients reach the CAM layer through the input, whatever the fine-tuning left frozen, and no
    parameter accumulates a ``.grad``; the flags are restored afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip(model.parameters(), flags, strict=True):
            param.requires_grad_(flag)


class _WithMetadata(torch.nn.Module):
    """The classifier as pytorch-grad-cam calls it, ``model(images)``, with the current batch's metadata."""

    def __init__(self, model: SkinLesionClassifier) -> None:
        super().__init__()
        self.model = model
        self.metadata: torch.Tensor | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, self.metadata)


def compute_cams(
    model: SkinLesionClassifier,
    images: torch.Tensor,
    method: str = "gradcam",
    targets: Sequence[int] | None = None,
    batch_size: int = 16,
    metadata: torch.Tensor | None = None,
) -> np.ndarray:
    """Heatmaps (N, H, W) in [0, 1] at the input size of uint8 NCHW ``images``, for ``targets`` (default:
    each image's predicted class); ``metadata``: the images' encoded metadata for a metadata model (None: all
    missing). The hooks are removed before returning, also on error."""
    cam_class = CAM_METHODS[check_method(method)]
    outputs = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
    was_training = model.training
    maps = []
    wrapped = _WithMetadata(model)
    with _gradients_to_input_only(model), torch.enable_grad():
        cam = cam_class(model=wrapped, target_layers=[model.gradcam_layer()])  # hooks the layer, sets eval mode
        try:  # explicit release: the CAM's __exit__ would swallow an IndexError
            for start in range(0, len(images), batch_size):
                batch = model.normalize(images[start : start + batch_size].to(model.device)).requires_grad_(True)
                if metadata is not None:
                    wrapped.metadata = metadata[start : start + batch_size].to(model.device)
                chosen = None if outputs is None else outputs[start : start + batch_size]
                maps.append(cam(input_tensor=batch, targets=chosen))
            feature_map = tuple(cam.activations_and_grads.activations[0].shape[-2:])
        finally:
            cam.activations_and_grads.release()
            model.train(was_training)
    if feature_map == (1, 1):
        log.warning(
            "%s's Grad-CAM layer is 1x1 at %d px, so the heatmaps carry no spatial information; use larger images",
            model.spec.name,
            images.shape[-1],
        )
    return np.concatenate(maps).astype(np.float32)


def cam_on_image(cam: np.ndarray, height: int, width: int, pre: Preprocessing, center_crop: bool) -> np.ndarray:
    """The input-sized heatmap on a ``height`` x ``width`` view of the original, undoing the eval transform
    (a square resize, then a centre crop if ``center_crop``; the cropped-off border gets 0)."""
    if center_crop:
        side, size = pre.resize_size, pre.image_size
        offset = (side - size) // 2  # Albumentations' CenterCrop
        canvas = np.zeros((side, side), np.float32)
        canvas[offset : offset + size, offset : offset + size] = cam
        cam = canvas
    return cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR)
