"""The clinical evaluation of a scored split, written into the run folder.

The statistics are pure functions in :mod:`skinlesion.clinical`; this module is where a run meets them.
Thresholds are fitted on the validation split's calibrated predictions (the
:class:`~skinlesion.clinical.thresholds.CalibrationSet`, which ``best.ckpt`` stores, so that `predict` and
`evaluate` refit them for their own settings without the data) and applied, fixed, to the split being
scored. Per split it writes:

- ``subgroups_<split>.csv/.png``: the subgroup audit (sex, age band, site, clinic, ground truth);
- ``risk_coverage_<split>.csv/.png``: selective prediction (AURC, balanced accuracy at 80/90% coverage);
- and, on a split the thresholds were not fitted on: ``operating_points_<split>.json/.csv/.png``
  (melanoma-vs-rest and malignant-vs-benign at 90%/95% validation specificity), ``conformal_<split>.json``
  (coverage of the prediction sets) and the share of images abstained on and flagged out of distribution.

The headline numbers go into ``metrics.json`` as ``<split>/<metric>`` keys; what was written, the notes
(a set without metadata, a threshold that could not be chosen) and the thresholds go under ``clinical``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.clinical.conformal import (
    image_sets,
    set_coverage,
)
from skinlesion.clinical.ood import ood_flags
from skinlesion.clinical.operating_points import (
    BINARY_TASKS,
    TARGET_SPECIFICITIES,
    operating_points,
)
from skinlesion.clinical.selective import (
    risk_coverage_curve,
    scores_when_kept,
    selective_summary,
)
from skinlesion.clinical.subgroups import AUDIT_COLUMNS, subgroup_audit
from skinlesion.clinical.thresholds import CalibrationSet, ClinicalTargets, Thresholds
from skinlesion.inference.predictions import SplitPredictions
from skinlesion.runfolder.files import write_json
from skinlesion.scoring.clinical_plots import plot_operating_points, plot_risk_coverage, plot_subgroups

log = logging.getLogger(__name__)


@dataclass
class ClinicalResult:
    """``<split>/<metric>`` numbers for metrics.json, and the split's entry of its ``clinical`` field."""

    metrics: dict[str, float]
    info: dict[str, Any]


def split_metadata(records: pd.DataFrame) -> pd.DataFrame | None:
    """The audit's metadata columns the split has values in (None: none, as for ISIC 2018 Test)."""
    present = [c for c in AUDIT_COLUMNS if c in records and records[c].replace("", np.nan).notna().any()]
    return records[present].reset_index(drop=True) if present else None


def _prefixed(split: str, values: Mapping[str, float]) -> dict[str, float]:
    return {f"{split}/{name}": float(value) for name, value in values.items()}


def _audit(
    out_dir: Path, split: str, predictions: SplitPredictions, rows: pd.DataFrame, result: ClinicalResult, figures: bool
) -> None:
    audit = subgroup_audit(
        predictions.probs.numpy(), predictions.labels.numpy(), rows["lesion_id"], split_metadata(rows)
    )
    result.info["notes"] += audit.notes
    if audit.table.empty:
        return
    audit.table.to_csv(out_dir / f"subgroups_{split}.csv", index=False)
    if figures:
        plot_subgroups(audit.table, out_dir / f"subgroups_{split}.png", title=split)
    flagged = audit.table[audit.table["flagged"]]
    result.info["flagged_subgroups"] = [
        f"{row.column}={row.subgroup}" for row in flagged.itertuples() if row.column != "all"
    ]
    result.metrics[f"{split}/subgroups_flagged"] = float(len(result.info["flagged_subgroups"]))
    result.info["files"] += [f"subgroups_{split}.csv"] + [f"subgroups_{split}.png"] * figures


def _selective(
    out_dir: Path, split: str, probs: np.ndarray, labels: np.ndarray, result: ClinicalResult, figures: bool
) -> None:
    curve = risk_coverage_curve(probs, labels)
    curve.to_csv(out_dir / f"risk_coverage_{split}.csv", index=False)
    summary = selective_summary(probs, labels)
    if figures:
        plot_risk_coverage(curve, summary, out_dir / f"risk_coverage_{split}.png", title=split)
    result.metrics |= _prefixed(split, summary)
    result.info["files"] += [f"risk_coverage_{split}.csv"] + [f"risk_coverage_{split}.png"] * figures


def _operating_points(
    out_dir: Path,
    split: str,
    calibration: CalibrationSet,
    probs: np.ndarray,
    labels: np.ndarray,
    lesions: Sequence,
    specificity: float,
    result: ClinicalResult,
    figures: bool,
) -> None:
    targets = tuple(sorted({*TARGET_SPECIFICITIES, specificity}))
    points = {}
    for task in BINARY_TASKS:  # one task without positives (no melanoma in val, say) leaves the other
        try:
            points |= operating_points(
                calibration.probs, calibration.labels, probs, labels, lesions, tasks=(task,), specificities=targets
            )
        except ValueError as err:  # a split without positives or negatives of the task
            result.info["notes"].append(f"{task} operating points not computed: {err}")
    if not points:
        return
    write_json(out_dir / f"operating_points_{split}.json", points)
    rows = [{"task": task, **point} for task, found in points.items() for point in found["points"]]
    pd.DataFrame(rows).to_csv(out_dir / f"operating_points_{split}.csv", index=False)
    if figures:
        plot_operating_points(probs, labels, points, out_dir / f"operating_points_{split}.png", title=split)
    for task, found in points.items():
        result.metrics |= _prefixed(
            split, {f"{task}_auroc": found["auroc"], f"{task}_average_precision": found["average_precision"]}
        )
        result.metrics |= _prefixed(
            split, {f"{task}_auroc_ci_low": found["auroc_low"], f"{task}_auroc_ci_high": found["auroc_high"]}
        )
        for point in found["points"]:
            at = f"at_spec{round(100 * point['target_specificity'])}"
            for measure in ("sensitivity", "specificity"):
                result.metrics |= _prefixed(
                    split,
                    {
                        f"{task}_{measure}_{at}": point[f"test_{measure}"],
                        f"{task}_{measure}_{at}_ci_low": point[f"test_{measure}_low"],
                        f"{task}_{measure}_{at}_ci_high": point[f"test_{measure}_high"],
                    },
                )
    result.info["files"] += [f"operating_points_{split}.{ext}" for ext in ("json", "csv", "png")[: 2 + figures]]


def write_clinical(
    out_dir: Path,
    split: str,
    predictions: SplitPredictions,
    records: pd.DataFrame,
    calibration: CalibrationSet | None,
    thresholds: Thresholds | None = None,
    fitted_here: bool = False,
    figures: bool = True,
) -> ClinicalResult:
    """Write the clinical evaluation of one split from its calibrated ``predictions``.

    ``calibration``: the validation predictions ``thresholds`` were fitted on (None: only the audit and
    the risk-coverage curve, which need none); ``fitted_here``: the split is that calibration set, so the
    threshold-based figures would be in-sample and are left to the other split; the predictions' raw logits,
    where they kept them, give the OOD share (else not reported); ``figures``: also the PNGs (a second or two
    each).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ClinicalResult({}, {"files": [], "notes": [], "flagged_subgroups": []})
    rows = predictions.records_of(records)
    probs, labels = predictions.probs.numpy().astype(np.float64), predictions.labels.numpy()
    _audit(out_dir, split, predictions, rows, result, figures)
    _selective(out_dir, split, probs, labels, result, figures)
    if calibration is None or thresholds is None or fitted_here:
        reason = "none fitted for this evaluation" if calibration is None else "fitted on this split"
        result.info["notes"].append(f"thresholds: {reason}; operating points and conformal coverage not reported here")
        return result
    result.info["notes"] += list(thresholds.notes)
    lesions = rows["lesion_id"].astype(str).to_numpy()
    specificity = thresholds.settings.specificity
    _operating_points(out_dir, split, calibration, probs, labels, lesions, specificity, result, figures)
    sets = image_sets(probs, thresholds.conformal, rows["image_id"].astype(str))
    coverage = set_coverage(sets, labels, lesions)
    write_json(out_dir / f"conformal_{split}.json", {"calibration": asdict(thresholds.conformal), **coverage})
    result.info["files"].append(f"conformal_{split}.json")
    result.metrics |= _prefixed(
        split,
        {f"conformal_{k}": v for k, v in coverage.items() if k in ("coverage", "coverage_lesion", "mean_set_size")},
    )
    kept = scores_when_kept(probs, labels, thresholds.abstain)
    result.metrics |= _prefixed(split, {f"abstain_{k}": v for k, v in kept.items()})
    if predictions.logits is not None:
        result.metrics[f"{split}/ood_flagged"] = float(
            ood_flags(predictions.logits.float().numpy(), thresholds.ood).mean()
        )
    return result


def evaluate_splits(
    out_dir: Path,
    splits: Mapping[str, SplitPredictions],
    records: pd.DataFrame,
    calibration: CalibrationSet | None,
    targets: ClinicalTargets | None = None,
    fitted_split: str | None = None,
    figures: bool = True,
) -> tuple[dict[str, float], dict[str, Any]]:
    """:func:`write_clinical` for each split of calibrated predictions; the metrics and ``metrics.json``'s
    ``clinical`` field (the targets, the thresholds fitted for them, each split's files and notes).
    ``fitted_split``: the split ``calibration`` holds (its figures would be in-sample)."""
    targets = targets or (calibration.settings if calibration is not None else None)
    thresholds = Thresholds.fit(calibration, targets) if calibration is not None else None
    metrics, infos = {}, {}
    for split, predictions in splits.items():
        found = write_clinical(
            out_dir,
            split,
            predictions,
            records,
            calibration,
            thresholds,
            split == fitted_split,
            figures,
        )
        metrics |= found.metrics
        infos[split] = found.info
        for note in found.info["notes"]:
            log.info("clinical evaluation of %s: %s", split, note)
    summary = {
        "targets": asdict(targets) if targets is not None else None,
        "thresholds": thresholds.to_dict() if thresholds is not None else None,
        "fitted_on": fitted_split or ("val" if calibration is not None else None),
        "splits": infos,
    }
    return metrics, summary
