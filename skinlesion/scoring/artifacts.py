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

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import classification_report, confusion_matrix

from skinlesion.models.metrics import probability_metrics
from skinlesion.plots import plot_confusion_matrix
from skinlesion.scoring.bootstrap import confidence_intervals, interval_method


def predictions_frame(
    image_ids: Sequence[str], labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> pd.DataFrame:
    frame = pd.DataFrame({"image_id": list(image_ids), "true": [classes[i] for i in labels]})
    for k, name in enumerate(classes):
        frame[f"prob_{name}"] = probs[:, k]
    frame["pred"] = [classes[i] for i in probs.argmax(axis=1)]
    return frame


def write_split_artifacts(
    out_dir: Path,
    split: str,
    probs: torch.Tensor,
    labels: torch.Tensor,
    image_ids: Sequence[str],
    lesion_ids: Sequence[str],
    classes: Sequence[str],
    lesion_known: Sequence[bool] | None = None,
) -> dict:
    """Write the split's predictions, confusion matrix and classification report; return its metrics, with
    lesion-bootstrap 95% intervals (``<split>/<metric>_ci_low|high``) for the top-1 ones and each class's recall."""
    out_dir.mkdir(parents=True, exist_ok=True)
    y_true, y_prob = labels.numpy(), probs.numpy()
    y_pred = y_prob.argmax(axis=1)
    frame = predictions_frame(image_ids, y_true, y_prob, classes)
    frame.insert(1, "lesion_id", list(lesion_ids))
    frame.insert(2, "lesion_known", [True] * len(frame) if lesion_known is None else list(lesion_known))
    frame.to_csv(out_dir / f"predictions_{split}.csv", index=False)

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
    metrics = probability_metrics(probs, labels, split, classes)
    for name, (low, high) in confidence_intervals(y_true, y_pred, lesion_ids, classes).items():
        metrics |= {f"{split}/{name}_ci_low": low, f"{split}/{name}_ci_high": high}
    return metrics


def split_interval_method(records: pd.DataFrame) -> dict[str, str]:
    """:func:`skinlesion.scoring.bootstrap.interval_method` of a split's records or of a ``predictions_<split>.csv``
    (one written before ``lesion_known`` was recorded counts as lesions, as its intervals were labelled)."""
    if "lesion_known" not in records:
        return interval_method([True] * len(records))
    return interval_method(records["lesion_known"].astype(str).str.lower().eq("true"))  # bool, or read from CSV
