"""The figures of Grad-CAM explanations: one image in full, or a true class's gallery page.

Drawing only: the heatmaps come from :mod:`skinlesion.gradcam.maps` and the images to show from
:mod:`skinlesion.gradcam.gallery` or the ``explain`` command.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pytorch_grad_cam.utils.image import show_cam_on_image

from skinlesion.gradcam.explanation import Explanation
from skinlesion.plots import plt, save_figure

METHOD_TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "eigencam": "EigenCAM"}


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    return show_cam_on_image(image.astype(np.float32) / 255, cam, use_rgb=True, image_weight=0.5)


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
