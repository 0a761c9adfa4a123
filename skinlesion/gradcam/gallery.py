"""Galleries of a split: per true class, the most confident correct and wrong predictions with heatmaps.

``explain split=...`` writes them for a checkpoint's split, and training writes the validation split's
into ``<run>/gradcam/`` when it ends (:func:`write_validation_gallery`), from the validation predictions
training made, so no second pass over the split is needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from skinlesion.data.datamodule import SkinLesionDataModule
from skinlesion.data.dataset import LesionDataset
from skinlesion.data.images import load_rgb
from skinlesion.gradcam.explanation import Explanation, explanation_row
from skinlesion.gradcam.figures import plot_class_gallery, plot_explanation
from skinlesion.gradcam.maps import check_method, compute_cams
from skinlesion.inference.predictions import SplitPredictions
from skinlesion.models.module import SkinLesionClassifier

log = logging.getLogger(__name__)

GALLERY_DIR = "gradcam"


@dataclass(frozen=True)
class GallerySettings:
    """What a split's gallery shows: up to ``per_class`` correct and wrong images per true class, their
    ``method`` heatmaps (mapped back through a centre crop when the model was fed one), and a full
    figure per shown image when ``panels``."""

    per_class: int
    method: str = "gradcam"
    center_crop: bool = False
    panels: bool = False

    def __post_init__(self) -> None:
        check_method(self.method)


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
    predictions: SplitPredictions,
    records: pd.DataFrame,
    out_dir: Path,
    settings: GallerySettings,
) -> pd.DataFrame:
    """``gallery_<class>.png`` per true class (see :func:`select_examples`), one panel per shown image
    when ``settings.panels``, and ``gallery.csv`` listing them. ``records``: the DataModule's (with ``path``,
    ``image_id``), which the predictions' indices and ``dataset.indices`` point into."""
    method = settings.method
    probs_np, labels_np = predictions.probs.float().numpy(), predictions.labels.numpy()
    records = predictions.records_of(records)
    picks = select_examples(probs_np, labels_np, settings.per_class)
    chosen = sorted({int(i) for kinds in picks.values() for rows in kinds.values() for i in rows})
    if not chosen:
        return pd.DataFrame()
    position = {int(index): i for i, index in enumerate(dataset.indices)}
    shown = records.iloc[chosen]
    loaded = [dataset[position[int(index)]] for index in shown.index]
    inputs = torch.stack([item["image"] for item in loaded])
    metadata = torch.stack([item["metadata"] for item in loaded]) if "metadata" in loaded[0] else None
    cams = compute_cams(model, inputs, method, targets=probs_np[chosen].argmax(1).tolist(), metadata=metadata)
    classes, pre = model.class_names, model.preprocessing
    items = {
        row: Explanation.build(
            record.image_id,
            load_rgb(record.path, dataset.max_pixels),
            cam,
            probs_np[row],
            pre,
            settings.center_crop,
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
                panel = out_dir / "images" / f"{item.name}.png" if settings.panels else None
                if panel is not None:
                    plot_explanation(item, classes, panel, method)
                where = {"image_id": item.name, "path": records.iloc[int(row)].path, "kind": kind}
                files = {"gallery": gallery.name, "panel": str(panel or "")}
                table.append(where | explanation_row(item, classes) | files)
    frame = pd.DataFrame(table)
    frame.to_csv(out_dir / "gallery.csv", index=False)
    return frame


def write_validation_gallery(
    module: SkinLesionClassifier,
    datamodule: SkinLesionDataModule,
    val: SplitPredictions,
    run_dir: Path,
    per_class: int,
    method: str,
) -> pd.DataFrame:
    """The end-of-training gallery in ``<run>/gradcam/``, from the validation predictions training already made
    (best weights, calibrated probabilities), so no second pass over the split is needed."""
    if per_class < 1:
        return pd.DataFrame()
    frame = write_split_gallery(
        module,
        datamodule.datasets["val"],
        val,
        datamodule.records,
        run_dir / GALLERY_DIR,
        GallerySettings(per_class, method, bool(datamodule.hparams.center_crop)),
    )
    log.info("Grad-CAM gallery of %d validation images in %s", len(frame), run_dir / GALLERY_DIR)
    return frame
