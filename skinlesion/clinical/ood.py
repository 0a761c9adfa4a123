"""Out-of-distribution flags: a photo that is not a dermoscopy image still gets a class; this says when
the model's outputs look unlike those it gives on the lesions it was validated on.

Scores come from logits, where probabilities have lost the overall scale (softmax ignores a shift of all
logits): energy ``-T * logsumexp(logits / T)`` (Liu et al. 2020) or the negated maximum logit (Hendrycks
et al. 2022). Both are signed so that higher means more unusual. The threshold is a quantile of the
in-distribution validation scores (by default the 95th percentile: about 5% of validation lesions are
flagged, by construction), so it needs no out-of-distribution examples. Score validation and new images
with the same logits (both raw, or both temperature-scaled).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

OOD_METHODS = ("energy", "max_logit")
QUANTILE = 0.95


@dataclass(frozen=True)
class OODCalibration:
    """What `predict` needs to flag images (store it with ``dataclasses.asdict``)."""

    method: str
    temperature: float
    quantile: float
    threshold: float


def ood_score(logits: np.ndarray, method: str = "energy", temperature: float = 1.0) -> np.ndarray:
    """(images,) higher = less like the validation lesions."""
    logits = np.asarray(logits, dtype=np.float64)
    if method == "energy":
        return -temperature * logsumexp(logits / temperature, axis=1)
    if method == "max_logit":
        return -logits.max(axis=1)
    raise ValueError(f"unknown OOD score '{method}'; choose one of {', '.join(OOD_METHODS)}")


def calibrate_ood(
    val_logits: np.ndarray, method: str = "energy", temperature: float = 1.0, quantile: float = QUANTILE
) -> OODCalibration:
    """The threshold: the ``quantile`` of the in-distribution validation scores."""
    threshold = float(np.quantile(ood_score(val_logits, method, temperature), quantile))
    return OODCalibration(method, float(temperature), float(quantile), threshold)


def ood_flags(logits: np.ndarray, calibration: OODCalibration) -> np.ndarray:
    """(images,) whether each image scores above the validation threshold."""
    return ood_score(logits, calibration.method, calibration.temperature) > calibration.threshold
