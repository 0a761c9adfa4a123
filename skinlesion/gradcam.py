"""Class-activation heatmaps (pytorch-grad-cam) for every backbone, drawn on the original images.

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
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from skinlesion.data.datamodule import SkinLesionDataModule
from skinlesion.data.dataset import LesionDataset
from skinlesion.data.images import load_rgb
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.errors import ConfigError
from skinlesion.inference.topk import format_top_k
from skinlesion.models.module import SkinLesionClassifier
from skinlesion.plots import plt, save_figure

log = logging.getLogger(__name__)

CAM_METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}
METHOD_TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "eigencam": "EigenCAM"}
GALLERY_DIR = "gradcam"
DISPLAY_SIDE = 384  # longer side of the originals in figures


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


def compute_cams(
    model: SkinLesionClassifier,
    images: torch.Tensor,
    method: str = "gradcam",
    targets: Sequence[int] | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Heatmaps (N, H, W) in [0, 1] at the input size of uint8 NCHW ``images``, for ``targets`` (default:
    each image's predicted class). The hooks are removed before returning, also on error."""
    cam_class = CAM_METHODS[check_method(method)]
    outputs = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
    was_training = model.training
    maps = []
    with _gradients_to_input_only(model), torch.enable_grad():
        cam = cam_class(model=model, target_layers=[model.gradcam_layer()])  # hooks the layer, sets eval mode
        try:  # explicit release: the CAM's __exit__ would swallow an IndexError
            for start in range(0, len(images), batch_size):
                batch = model.normalize(images[start : start + batch_size].to(model.device)).requires_grad_(True)
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


def for_display(image: np.ndarray, side: int = DISPLAY_SIDE) -> np.ndarray:
    scale = side / max(image.shape[:2])
    if scale >= 1:
        return image
    return cv2.resize(
        image, (round(image.shape[1] * scale), round(image.shape[0] * scale)), interpolation=cv2.INTER_AREA
    )


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    return show_cam_on_image(image.astype(np.float32) / 255, cam, use_rgb=True, image_weight=0.5)


@dataclass
class Explanation:
    """One image for a figure: the (downscaled) original, its heatmap on those pixels, the probabilities."""

    name: str
    image: np.ndarray
    cam: np.ndarray
    probs: np.ndarray
    label: int | None = None

    @classmethod
    def build(
        cls,
        name: str,
        original: np.ndarray,
        cam: np.ndarray,
        probs: np.ndarray,
        pre: Preprocessing,
        center_crop: bool,
        label: int | None = None,
    ) -> Explanation:
        image = for_display(original)
        return cls(name, image, cam_on_image(cam, *image.shape[:2], pre, center_crop), np.asarray(probs), label)

    @property
    def pred(self) -> int:
        return int(self.probs.argmax())


def _top3_bars(ax: plt.Axes, item: Explanation, classes: Sequence[str]) -> None:
    order = np.argsort(-item.probs)[:3][::-1]
    colours = ["tab:green" if item.label == k else "tab:blue" for k in order]
    ax.barh([classes[k] for k in order], item.probs[order], color=colours)
    for y, k in enumerate(order):
        ax.text(min(item.probs[k] + 0.02, 0.8), y, f"{item.probs[k]:.3f}", va="center")
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    ax.set_title("top-3 predictions" + ("\n(green: true class)" if item.label is not None else ""))


def plot_explanation(item: Explanation, classes: Sequence[str], path: Path, method: str) -> None:
    """Original (with the true label when known), heatmap overlay, top-3 probabilities."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1, 0.8]})
    truth = f"true: {classes[item.label]}" if item.label is not None else "true: unknown"
    axes[0].imshow(item.image)
    axes[0].set_title(f"{item.name}\n{truth}")
    axes[1].imshow(overlay(item.image, item.cam))
    axes[1].set_title(f"{METHOD_TITLES[method]}\npredicted: {classes[item.pred]} {item.probs[item.pred]:.3f}")
    for ax in axes[:2]:
        ax.axis("off")
    _top3_bars(axes[2], item, classes)
    save_figure(fig, path)


def plot_class_gallery(
    class_index: int,
    correct: Sequence[Explanation],
    wrong: Sequence[Explanation],
    classes: Sequence[str],
    path: Path,
    method: str,
) -> None:
    """Images of one true class: correct predictions on the left, wrong ones on the right, each as the
    original and its heatmap for the predicted class."""
    rows = max(len(correct), len(wrong), 1)
    fig, axes = plt.subplots(rows, 4, figsize=(12, 3.1 * rows), squeeze=False)
    title = METHOD_TITLES[method]
    for column, (kind, items) in enumerate((("correct", correct), ("wrong", wrong))):
        left, right = axes[:, 2 * column], axes[:, 2 * column + 1]
        left[0].set_title(f"{kind} ({len(items)})\noriginal", fontsize=10)
        right[0].set_title(f"{kind}\n{title} for the prediction", fontsize=10)
        for row in range(rows):
            left[row].axis("off")
            right[row].axis("off")
            if row >= len(items):
                if row == 0:
                    left[row].text(0.5, 0.5, "none", ha="center", va="center", transform=left[row].transAxes)
                continue
            item = items[row]
            left[row].imshow(item.image)
            left[row].text(0.5, -0.04, item.name, ha="center", va="top", fontsize=8, transform=left[row].transAxes)
            right[row].imshow(overlay(item.image, item.cam))
            caption = f"pred {classes[item.pred]} {item.probs[item.pred]:.2f}"
            right[row].text(0.5, -0.04, caption, ha="center", va="top", fontsize=8, transform=right[row].transAxes)
    fig.suptitle(f"true class {classes[class_index]}", fontsize=12)
    save_figure(fig, path)


def select_examples(probs: np.ndarray, labels: np.ndarray, per_class: int) -> dict[int, dict[str, np.ndarray]]:
    """Rows of each true class, up to ``per_class`` correct and ``per_class`` wrong, the most confident
    first (a confident mistake is the one worth looking at)."""
    predicted, confidence = probs.argmax(1), probs.max(1)
    picks = {}
    for k in range(probs.shape[1]):
        rows = np.flatnonzero(labels == k)
        rows = rows[np.argsort(-confidence[rows], kind="stable")]
        picks[k] = {"correct": rows[predicted[rows] == k][:per_class], "wrong": rows[predicted[rows] != k][:per_class]}
    return picks


def write_split_gallery(
    model: SkinLesionClassifier,
    dataset: LesionDataset,
    records: pd.DataFrame,
    probs: torch.Tensor,
    labels: torch.Tensor,
    out_dir: Path,
    per_class: int,
    method: str = "gradcam",
    center_crop: bool = False,
    panels: bool = False,
) -> pd.DataFrame:
    """``gallery_<class>.png`` per true class (see :func:`select_examples`), one panel per shown image
    when ``panels``, and ``gallery.csv`` listing them. ``records`` (with ``path``, ``image_id``; indexed
    like ``dataset.indices``) are aligned with the rows of ``probs`` and ``labels``."""
    check_method(method)
    probs_np, labels_np = probs.float().numpy(), labels.numpy()
    picks = select_examples(probs_np, labels_np, per_class)
    chosen = sorted({int(i) for kinds in picks.values() for rows in kinds.values() for i in rows})
    if not chosen:
        return pd.DataFrame()
    position = {int(index): i for i, index in enumerate(dataset.indices)}
    shown = records.iloc[chosen]
    inputs = torch.stack([dataset[position[int(index)]]["image"] for index in shown.index])
    cams = compute_cams(model, inputs, method, targets=probs_np[chosen].argmax(1).tolist())
    classes, pre = model.class_names, model.preprocessing
    items = {
        row: Explanation.build(
            record.image_id,
            load_rgb(record.path, dataset.max_pixels),
            cam,
            probs_np[row],
            pre,
            center_crop,
            int(labels_np[row]),
        )
        for row, record, cam in zip(chosen, shown.itertuples(), cams, strict=True)
    }
    table = []
    for k, kinds in picks.items():
        if not any(len(rows) for rows in kinds.values()):
            continue
        gallery = out_dir / f"gallery_{classes[k]}.png"
        correct, wrong = ([items[int(row)] for row in kinds[kind]] for kind in ("correct", "wrong"))
        plot_class_gallery(k, correct, wrong, classes, gallery, method)
        for kind, rows in kinds.items():
            for row in rows:
                item = items[int(row)]
                panel = out_dir / "images" / f"{item.name}.png" if panels else None
                if panel is not None:
                    plot_explanation(item, classes, panel, method)
                where = {"image_id": item.name, "path": records.iloc[int(row)].path, "kind": kind}
                files = {"gallery": gallery.name, "panel": str(panel or "")}
                table.append(where | explanation_row(item, classes) | files)
    frame = pd.DataFrame(table)
    frame.to_csv(out_dir / "gallery.csv", index=False)
    return frame


def explanation_row(item: Explanation, classes: Sequence[str]) -> dict:
    """The table columns of one explained image."""
    return {
        "true": classes[item.label] if item.label is not None else "",
        "pred": classes[item.pred],
        "confidence": round(float(item.probs[item.pred]), 4),
        "top3": format_top_k(item.probs, classes),
    }


def write_validation_gallery(
    module: SkinLesionClassifier, datamodule: SkinLesionDataModule, run_dir: Path, per_class: int, method: str
) -> pd.DataFrame:
    """The end-of-training gallery in ``<run>/gradcam/``, from the validation outputs the module kept
    (best weights, calibrated probabilities), so no second pass over the split is needed."""
    out = module.outputs.get("val")
    if out is None or per_class < 1:
        return pd.DataFrame()
    probs = (out["logits"].float() / float(module.temperature)).softmax(1)
    records = datamodule.records.loc[out["indices"].numpy()]
    frame = write_split_gallery(
        module,
        datamodule.datasets["val"],
        records,
        probs,
        out["labels"],
        run_dir / GALLERY_DIR,
        per_class,
        method,
        bool(datamodule.hparams.center_crop),
    )
    log.info("Grad-CAM gallery of %d validation images in %s", len(frame), run_dir / GALLERY_DIR)
    return frame
