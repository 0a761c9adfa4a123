"""Matplotlib figures for run folders and reports (headless: the Agg backend, files only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import auc, roc_curve


def save_figure(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_training_curves(history: pd.DataFrame, path: Path) -> None:
    """Loss, balanced accuracy and learning rates per epoch; a dotted line where stage 2 began."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    epochs = history["epoch"]
    for ax, metric, title in ((axes[0], "loss", "loss"), (axes[1], "balanced_acc", "balanced accuracy")):
        for split in ("train", "val"):
            column = f"{split}/{metric}"
            if column in history:
                ax.plot(epochs, history[column], marker="o", label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    for column in [c for c in history.columns if c.startswith("lr/")]:
        axes[2].plot(epochs, history[column], marker="o", label=column[3:])
    axes[2].set_yscale("log")
    axes[2].set_title("learning rate (end of epoch)")
    axes[2].set_xlabel("epoch")
    axes[2].legend()
    if "trainable_params" in history:
        jumps = history["epoch"][history["trainable_params"].diff() > 0]
        for ax in axes:
            for epoch in jumps:
                ax.axvline(epoch - 0.5, color="grey", linestyle=":")
    save_figure(fig, path)


def _matrix(ax: plt.Axes, matrix: np.ndarray, classes: Sequence[str], title: str, fmt: str) -> None:
    ax.imshow(matrix, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(classes)), classes, rotation=45)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = matrix.max() if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            format(value, fmt),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if top and value > top / 2 else "black",
        )


def plot_confusion_matrix(counts: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> None:
    """Counts and row-normalised (recall per true class) side by side."""
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.nan_to_num(counts / counts.sum(axis=1, keepdims=True))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    _matrix(axes[0], counts, classes, f"{title} counts".strip(), "d")
    _matrix(axes[1], normalised, classes, f"{title} row-normalised".strip(), ".2f")
    save_figure(fig, path)


def plot_confusion_grid(matrices: Mapping[str, np.ndarray], classes: Sequence[str], path: Path) -> None:
    """Row-normalised confusion matrices of several runs side by side."""
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 5), squeeze=False)
    for ax, (name, counts) in zip(axes[0], matrices.items(), strict=True):
        with np.errstate(invalid="ignore", divide="ignore"):
            _matrix(ax, np.nan_to_num(counts / counts.sum(axis=1, keepdims=True)), classes, name, ".2f")
    save_figure(fig, path)


def plot_metric_bars(
    means: pd.DataFrame, errors: Mapping[str, np.ndarray], path: Path, title: str = "", note: str = ""
) -> None:
    """Grouped bars: one group per row of ``means`` (a backbone), one bar per column (a metric), with error
    bars ``errors[metric]`` of shape (2, rows): the distance below and above each bar (NaN: none)."""
    n_rows, n_metrics = means.shape
    width = 0.8 / max(n_metrics, 1)
    x = np.arange(n_rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * n_rows * max(1, n_metrics / 4)), 4.5))
    for k, metric in enumerate(means.columns):
        bars = errors.get(metric)
        bars = bars if bars is not None and np.nan_to_num(bars).any() else None  # NaN: no bar for that row
        ax.bar(x + (k - (n_metrics - 1) / 2) * width, means[metric], width, yerr=bars, capsize=3, label=metric)
    if note:
        ax.text(0.99, 0.98, note, transform=ax.transAxes, ha="right", va="top", fontsize=7, color="grey")
    ax.set_xticks(x, [str(i) for i in means.index], rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncols=min(n_metrics, 5), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    save_figure(fig, path)


def plot_roc_grid(predictions: Mapping[str, tuple[np.ndarray, np.ndarray]], classes: Sequence[str], path: Path) -> None:
    """One-vs-rest ROC curves of every class, one panel per entry of ``{name: (labels, probs)}``."""
    n = len(predictions)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4.5), squeeze=False)
    for ax, (name, (labels, probs)) in zip(axes[0], predictions.items(), strict=True):
        for k, cls in enumerate(classes):
            positives = labels == k
            if positives.all() or not positives.any():  # undefined without both positives and negatives
                continue
            fpr, tpr, _ = roc_curve(positives, probs[:, k])
            ax.plot(fpr, tpr, linewidth=1.2, label=f"{cls} {auc(fpr, tpr):.3f}")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(name)
        ax.legend(title="AUC", fontsize=7, loc="lower right")
    save_figure(fig, path)
