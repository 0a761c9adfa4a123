"""The figures of the clinical evaluation: what a reader checks by eye before reading the tables."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from skinlesion.clinical.operating_points import binary_curves, binary_score, binary_truth
from skinlesion.clinical.subgroups import AUDIT_METRIC_NAMES, AUDIT_METRICS
from skinlesion.plots import plt, save_figure


def plot_subgroups(table: pd.DataFrame, path: Path, title: str = "") -> None:
    """A forest plot per metric: each subgroup's value and interval against the whole split's (dotted);
    flagged subgroups (interval wholly below it) in red."""
    rows = table.iloc[::-1].reset_index(drop=True)  # the whole split on top
    labels = [
        f"{r.column}: {r.subgroup} ({r.n_lesions})" if r.column != "all" else "whole split" for r in rows.itertuples()
    ]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(
        1, len(AUDIT_METRICS), figsize=(4 * len(AUDIT_METRICS) + 2, 0.28 * len(rows) + 1.5), sharey=True, squeeze=False
    )
    for ax, metric in zip(axes[0], AUDIT_METRICS, strict=True):
        value = rows[metric].to_numpy(float)
        low, high = rows[f"{metric}_low"].to_numpy(float), rows[f"{metric}_high"].to_numpy(float)
        colours = np.where(rows[f"{metric}_flagged"].astype(bool), "tab:red", "tab:blue")
        ax.errorbar(value, y, xerr=[np.abs(value - low), np.abs(high - value)], fmt="none", ecolor=colours, lw=1)
        ax.scatter(value, y, c=colours, s=14, zorder=3)
        whole = table[metric].iloc[0]
        if np.isfinite(whole):
            ax.axvline(whole, color="grey", linestyle=":", linewidth=1)
        ax.set_xlim(-0.02, 1.02)
        ax.set_title(AUDIT_METRIC_NAMES.get(metric, metric), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, labels, fontsize=7)
    fig.suptitle(f"{title} subgroups (lesions in brackets; red: interval below the whole split)".strip(), fontsize=9)
    save_figure(fig, path)


def plot_operating_points(
    probs: np.ndarray, labels: np.ndarray, points: Mapping[str, dict], path: Path, title: str = ""
) -> None:
    """ROC and precision-recall curve of each binary task, with the operating points chosen on validation."""
    fig, axes = plt.subplots(2, len(points), figsize=(4.5 * len(points), 8.5), squeeze=False)
    for column, (task, found) in enumerate(points.items()):
        curves = binary_curves(binary_score(probs, task), binary_truth(labels, task))
        roc, pr = axes[0][column], axes[1][column]
        roc.plot(curves["fpr"], curves["tpr"], linewidth=1.2, label=f"AUROC {curves['auroc']:.3f}")
        for point in found["points"]:
            spec = point["target_specificity"]
            roc.scatter(
                1 - point["test_specificity"],
                point["test_sensitivity"],
                zorder=3,
                label=f"val spec {spec:.0%}: sens {point['test_sensitivity']:.2f}",
            )
        roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        roc.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity", title=f"{title} {task}")
        roc.legend(fontsize=7, loc="lower right")
        pr.plot(curves["recall"], curves["precision"], linewidth=1.2, label=f"AP {curves['average_precision']:.3f}")
        pr.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall (sensitivity)", ylabel="precision")
        pr.legend(fontsize=7, loc="lower left")
    save_figure(fig, path)


def plot_risk_coverage(curve: pd.DataFrame, summary: Mapping[str, float], path: Path, title: str = "") -> None:
    """Risk of the images kept against the share kept, most confident first."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.plot(curve["coverage"], curve["error"], label=f"1 - accuracy (AURC {summary['aurc']:.3f})")
    ax.plot(
        curve["coverage"], curve["balanced_error"], label=f"1 - balanced acc. (AURC {summary['aurc_balanced']:.3f})"
    )
    for key in [k for k in summary if k.startswith("coverage_at_")]:
        ax.axvline(summary[key], color="grey", linestyle=":", linewidth=1)
    ax.set(xlim=(0, 1.01), ylim=(0, 1), xlabel="coverage (share of images kept)", ylabel="risk on the kept images")
    ax.set_title(f"{title} risk-coverage".strip())
    ax.legend(fontsize=8, loc="upper left")
    save_figure(fig, path)
