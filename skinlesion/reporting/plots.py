"""The report's figures: headline metrics per configuration with error bars, confusion matrices and
one-vs-rest ROC curves, the runs of a configuration pooled.

The drawing itself is :mod:`skinlesion.plots` (shared with the run folders); this module chooses what
each figure shows from the summary and the runs' files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from skinlesion.inference.predictions import SplitPredictions
from skinlesion.labels import CLASSES
from skinlesion.models.metrics import HEADLINE_METRICS
from skinlesion.plots import plot_confusion_grid, plot_metric_bars, plot_roc_grid
from skinlesion.reporting.collect import run_predictions
from skinlesion.reporting.rank import Report, completed_runs
from skinlesion.scoring.bootstrap import LEVEL

METRICS_PNG, CONFUSION_PNG, ROC_PNG = "summary_metrics.png", "summary_confusion.png", "summary_roc.png"


def _label(row: pd.Series) -> str:
    return f"{row['backbone']} {row['config']}".strip()


def _pooled_predictions(runs: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    frames = [frame for r in runs["run_dir"] if (frame := run_predictions(r, split)) is not None]
    if not frames:
        return None
    pooled = SplitPredictions.from_frame(pd.concat(frames, ignore_index=True))
    return pooled.labels.numpy(), pooled.probs.numpy()


def _pooled_confusion(runs: pd.DataFrame, split: str) -> np.ndarray | None:
    files = [p for p in (Path(r) / f"confusion_matrix_{split}.csv" for r in runs["run_dir"]) if p.is_file()]
    if not files:
        return None
    return sum(pd.read_csv(p, index_col=0).to_numpy() for p in files)


def error_bars(done: pd.DataFrame, metric: str) -> np.ndarray:
    """(2, rows) distances below and above each row's score: ±std over seeds where several ran, else the
    bootstrap interval of the one run (for the metrics that have one), else NaN (no bar)."""
    score = pd.to_numeric(done[metric], errors="coerce").to_numpy(dtype=float)
    std = pd.to_numeric(done[f"{metric}_std"], errors="coerce").to_numpy(dtype=float)
    below, above = std.copy(), std.copy()
    if f"{metric}_ci_low" in done:
        one_run = np.isnan(std)
        below[one_run] = score[one_run] - pd.to_numeric(done[f"{metric}_ci_low"], errors="coerce").to_numpy()[one_run]
        above[one_run] = pd.to_numeric(done[f"{metric}_ci_high"], errors="coerce").to_numpy()[one_run] - score[one_run]
    return np.clip(np.stack([below, above]), 0, None)  # NaN: no bar


def write_plots(report: Report, out_dir: Path) -> None:
    """Headline metrics per configuration, confusion matrices and ROC curves (seeds pooled)."""
    done = report.summary[report.summary["status"] == "completed"]
    if done.empty:
        return
    labels = [_label(row) for _, row in done.iterrows()]
    means = done[list(HEADLINE_METRICS)].set_axis(labels)
    errors = {metric: error_bars(done, metric) for metric in HEADLINE_METRICS}
    title = f"{report.folder.name} ({'/'.join(set(done['split']))})"
    unit = "/".join(sorted(set(done["ci_resampled"].dropna()))) or "lesion"
    note = f"error bars: ±std over seeds, else the {LEVEL:.0%} {unit}-bootstrap interval (acc, bal. acc, F1)"
    plot_metric_bars(means, errors, out_dir / METRICS_PNG, title=title, note=note)
    matrices, curves = {}, {}
    for label, (_, row) in zip(labels, done.iterrows(), strict=True):
        members = completed_runs(report.runs, row)
        split = members["split"].iloc[0]
        name = f"{label} ({split}, {len(members)} runs pooled)" if len(members) > 1 else f"{label} ({split})"
        if (counts := _pooled_confusion(members, split)) is not None:
            matrices[name] = counts
        if (pooled := _pooled_predictions(members, split)) is not None:
            curves[name] = pooled
    if matrices:
        plot_confusion_grid(matrices, CLASSES, out_dir / CONFUSION_PNG)
    if curves:
        plot_roc_grid(curves, CLASSES, out_dir / ROC_PNG)
