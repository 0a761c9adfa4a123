"""The thresholds a trained model carries for its clinical decisions, fitted on its validation predictions.

``best.ckpt`` stores the validation split's logits, labels and lesion ids with the temperature and the
``clinical.*`` settings of training (a :class:`CalibrationSet`); :meth:`Thresholds.fit` turns them into
the melanoma and malignant flag thresholds, the conformal quantile, the abstain confidence and the OOD
threshold for any settings, so ``predict`` and ``evaluate`` refit them without the data, and
:meth:`Thresholds.decisions` applies them to new images.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from skinlesion.clinical.conformal import (
    ConformalCalibration,
    calibrate_conformal,
    image_sets,
    set_labels,
)
from skinlesion.clinical.ood import OODCalibration, calibrate_ood, ood_flags, ood_score
from skinlesion.clinical.operating_points import (
    BINARY_TASKS,
    binary_score,
    binary_truth,
    positive_flag,
    threshold_for_specificity,
)
from skinlesion.clinical.selective import (
    abstain,
    confidence_threshold,
)
from skinlesion.inference.predictions import SplitPredictions, probabilities

log = logging.getLogger(__name__)

DECISION_COLUMNS = ("prediction_set", "melanoma_flag", "malignant_flag", "abstain", "ood_score", "ood_flag")


@dataclass(frozen=True)
class ClinicalTargets:
    """``clinical.*`` of the config: what the thresholds aim for (range-checked in :mod:`skinlesion.settings`)."""

    alpha: float  # conformal sets may miss the true class this often
    specificity: float  # predict's melanoma/malignant flags: the threshold reaching this on validation
    coverage: float  # predict abstains below the confidence that keeps this share of validation
    ood_quantile: float  # the share of validation lesions under the OOD threshold
    ood_method: str  # energy or max_logit

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> ClinicalTargets:
        return cls(**{k: node[k] for k in cls.__dataclass_fields__ if node.get(k) is not None})

    def overridden(self, node: Mapping[str, Any] | None) -> ClinicalTargets:
        """These settings with the non-null values of ``node`` (null in predict/evaluate: the checkpoint's)."""
        chosen = {k: v for k, v in (node or {}).items() if k in self.__dataclass_fields__ and v is not None}
        return replace(self, **chosen)


@dataclass(frozen=True)
class CalibrationSet:
    """The validation predictions thresholds are fitted on: raw logits, labels, lesion ids, the temperature,
    and the settings training fitted them for. Small (classes + 1 numbers per image), so it travels in
    ``best.ckpt`` and any threshold can be refitted for other settings without the data."""

    logits: np.ndarray
    labels: np.ndarray
    lesion_ids: tuple[str, ...]
    temperature: float
    settings: ClinicalTargets

    @classmethod
    def from_predictions(
        cls, val: SplitPredictions, records: pd.DataFrame, temperature: float, settings: ClinicalTargets
    ) -> CalibrationSet:
        lesions = tuple(str(v) for v in val.records_of(records)["lesion_id"])
        return cls(val.logits.float().numpy(), val.labels.numpy(), lesions, float(temperature), settings)

    @property
    def probs(self) -> np.ndarray:
        return probabilities(torch.from_numpy(self.logits), self.temperature).numpy()

    def to_checkpoint(self) -> dict[str, Any]:
        """Tensors and plain values only: ``torch.load(weights_only=True)`` reads it."""
        return {
            "logits": torch.from_numpy(self.logits).float(),
            "labels": torch.from_numpy(np.asarray(self.labels, dtype=np.int64)),
            "lesion_ids": list(self.lesion_ids),
            "temperature": self.temperature,
            "settings": asdict(self.settings),
        }

    @classmethod
    def from_checkpoint(cls, entry: Mapping[str, Any]) -> CalibrationSet:
        return cls(
            entry["logits"].float().numpy(),
            entry["labels"].numpy(),
            tuple(entry["lesion_ids"]),
            float(entry["temperature"]),
            ClinicalTargets(**entry["settings"]),
        )


@dataclass(frozen=True)
class Thresholds:
    """Everything `predict` decides with, fitted on a :class:`CalibrationSet` for one set of settings."""

    settings: ClinicalTargets
    conformal: ConformalCalibration
    flags: dict[str, float | None]  # task -> score threshold at settings.specificity (None: not choosable)
    abstain: float  # the confidence below which to abstain
    ood: OODCalibration
    notes: tuple[str, ...] = ()

    @classmethod
    def fit(cls, calibration: CalibrationSet, settings: ClinicalTargets | None = None) -> Thresholds:
        settings = settings or calibration.settings
        probs, labels = calibration.probs, calibration.labels
        flags, notes = {}, []
        for task in BINARY_TASKS:
            try:
                flags[task] = threshold_for_specificity(
                    binary_score(probs, task), binary_truth(labels, task), settings.specificity
                )
            except ValueError as err:  # a validation split without positives (or negatives) of the task
                flags[task] = None
                notes.append(f"{task} flag: no threshold ({err})")
        return cls(
            settings=settings,
            conformal=calibrate_conformal(probs, labels, calibration.lesion_ids, settings.alpha),
            flags=flags,
            abstain=confidence_threshold(probs, settings.coverage),
            ood=calibrate_ood(calibration.logits, settings.ood_method, calibration.temperature, settings.ood_quantile),
            notes=tuple(notes),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"notes": list(self.notes)}

    def decisions(self, probs: np.ndarray, logits: np.ndarray | None, image_ids: Sequence[str]) -> pd.DataFrame:
        """`predict`'s columns for each image: its conformal set (randomised by its image id, as in
        `evaluate`'s coverage, so a set does not depend on the batch), the melanoma/malignant flags, whether
        to abstain, and the OOD score and flag (empty without ``logits``)."""
        sets = image_sets(probs, self.conformal, image_ids)
        frame = pd.DataFrame({"prediction_set": set_labels(sets)})
        for task, threshold in self.flags.items():
            frame[f"{task}_flag"] = positive_flag(probs, threshold, task) if threshold is not None else None
        frame["abstain"] = abstain(probs, self.abstain)
        frame["ood_score"] = ood_score(logits, self.ood.method, self.ood.temperature) if logits is not None else None
        frame["ood_flag"] = ood_flags(logits, self.ood) if logits is not None else None
        return frame
