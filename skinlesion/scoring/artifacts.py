"""What a finished evaluation leaves in a run folder, for training and `evaluate` alike.

Per split: ``predictions_<split>.csv`` (image, lesion, whether the dataset named the lesion, per-class
probabilities), ``confusion_matrix_<split>.csv/.png`` (counts and row-normalised) and
``classification_report_<split>.csv/.json/.txt``. Metrics are computed from the probabilities with the
same definitions the training loop logs, plus lesion-bootstrap intervals (image-bootstrap where the
dataset names no lesions: :func:`split_interval_method` says which).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix

from skinlesion.inference.predictions import SplitPredictions
from skinlesion.models.metrics import probability_metrics
from skinlesion.plots import plot_confusion_matrix
from skinlesion.scoring.bootstrap import confidence_intervals, interval_method


def write_split_artifacts(
    out_dir: Path, split: str, predictions: SplitPredictions, records: pd.DataFrame, classes: Sequence[str]
) -> dict:
    """Write the split's predictions, confusion matrix and classification report; return its metrics, with
    lesion-bootstrap 95% intervals (``<split>/<metric>_ci_low|high``) for the top-1 ones and each class's recall.
    ``records``: the DataModule's records the predictions' indices point into."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = predictions.to_frame(records, classes)
    frame.to_csv(out_dir / f"predictions_{split}.csv", index=False)
    y_true, y_pred = predictions.labels.numpy(), predictions.preds

    ids = list(range(len(classes)))
    counts = confusion_matrix(y_true, y_pred, labels=ids)
    pd.DataFrame(counts, index=pd.Index(classes, name="true"), columns=classes).to_csv(
        out_dir / f"confusion_matrix_{split}.csv"
    )
    plot_confusion_matrix(counts, classes, out_dir / f"confusion_matrix_{split}.png", title=split)

    report = classification_report(
        y_true, y_pred, labels=ids, target_names=list(classes), output_dict=True, zero_division=0
    )
    (out_dir / f"classification_report_{split}.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = {k: v for k, v in report.items() if isinstance(v, dict)}
    pd.DataFrame(rows).T.rename_axis("class").to_csv(out_dir / f"classification_report_{split}.csv")
    text = classification_report(y_true, y_pred, labels=ids, target_names=list(classes), digits=4, zero_division=0)
    (out_dir / f"classification_report_{split}.txt").write_text(text)
    metrics = probability_metrics(predictions.probs, predictions.labels, split, classes)
    for name, (low, high) in confidence_intervals(y_true, y_pred, frame["lesion_id"], classes).items():
        metrics |= {f"{split}/{name}_ci_low": low, f"{split}/{name}_ci_high": high}
    return metrics


def split_interval_method(records: pd.DataFrame) -> dict[str, str]:
    """:func:`skinlesion.scoring.bootstrap.interval_method` of a split's records or of a ``predictions_<split>.csv``
    (one written before ``lesion_known`` was recorded counts as lesions, as its intervals were labelled)."""
    if "lesion_known" not in records:
        return interval_method([True] * len(records))
    return interval_method(records["lesion_known"].astype(str).str.lower().eq("true"))  # bool, or read from CSV
