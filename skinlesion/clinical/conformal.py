"""Split conformal prediction sets: a set of classes per image that holds the true one with probability
at least 1 - alpha, whatever the model, provided calibration and test cases are exchangeable.

Score. APS (Romano et al. 2020): the probability mass of the classes ranked above the true one plus the
true one's, times u ~ U(0, 1) when randomised, else all of it. RAPS (Angelopoulos et al. 2021) adds
``lam * max(0, rank - k_reg)``, which keeps unlikely classes out of the sets; ``lam = 0`` is APS. A
class enters an image's set when its score is at most q, the ceil((n + 1)(1 - alpha))-th smallest of the
n calibration scores (infinite, every class, when that exceeds n): the finite-sample correction.

Lesions. Several photos of one lesion are not exchangeable with photos of other lesions: they share the
lesion, and lesions with many photos (often follow-up naevi, which are easy) would outweigh the others.
The unit that is exchangeable is the lesion, so given lesion ids the quantile is taken over one photo per
lesion, drawn at random with ``seed`` (subsampling, as Dunn, Wasserman and Ramdas 2022 do for two-layer
hierarchical data); the guarantee is then for a random photo of a new lesion, and :func:`set_coverage`
reports coverage per lesion (each lesion counts once) beside coverage per image. Without lesion ids
every image is its own lesion.

Randomised by default: without it the true class of a confidently right image scores its whole
probability, near 1, so q lands near 1 and every less certain image gets a large set; a confident
classifier then covers nearly 100% with sets far larger than needed (a test shows it). The draw is seeded
(``seed``), so a run's sets are reproducible; `predict` should seed per image (from its id, say) so that
an image's set does not depend on the batch it came in, by passing ``u``.

Sets are never empty unless asked (``allow_empty``): an empty set would only happen when q is below the
top class's score, and adding the top class can only raise coverage.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from skinlesion.labels import CLASSES

ALPHA = 0.1
SEED = 0


@dataclass(frozen=True)
class ConformalCalibration:
    """What `predict` needs to build sets (store it with ``dataclasses.asdict``)."""

    qhat: float
    alpha: float
    lam: float
    k_reg: int
    randomized: bool
    n_calibration: int  # scores the quantile was taken over: lesions, or images without lesion ids
    grouping: str  # "one_per_lesion" or "image"


def conformity_scores(probs: np.ndarray, lam: float = 0.0, k_reg: int = 0, u: np.ndarray | None = None) -> np.ndarray:
    """(images, classes): the APS/RAPS score each class would have as the true one; ``u`` (images,) the
    randomisation, None for the non-randomised score (u = 1)."""
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(probs.shape[1])[None, :], axis=1)  # 0 = most likely
    mass_above = np.take_along_axis(np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1), rank, axis=1) - probs
    share = 1.0 if u is None else np.asarray(u, dtype=np.float64)[:, None]
    return mass_above + share * probs + lam * np.maximum(0, rank + 1 - k_reg)


def conformal_quantile(scores: np.ndarray, alpha: float = ALPHA) -> float:
    """The ceil((n + 1)(1 - alpha))-th smallest score; ``inf`` when that rank exceeds n."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    k = int(np.ceil((len(scores) + 1) * (1 - alpha) - 1e-9))  # 1e-9: (n + 1) * 0.9 is not exact in binary
    return float(scores[k - 1]) if k <= len(scores) else float("inf")


def one_per_lesion(lesion_ids: Sequence, seed: int = SEED) -> np.ndarray:
    """Indices of one photo of each lesion, drawn uniformly at random."""
    lesions = np.asarray(lesion_ids, dtype=str)
    shuffled = np.random.default_rng(seed).permutation(len(lesions))
    _, first = np.unique(lesions[shuffled], return_index=True)
    return np.sort(shuffled[first])


def calibrate_conformal(
    probs: np.ndarray,
    labels: np.ndarray,
    lesion_ids: Sequence | None = None,
    alpha: float = ALPHA,
    lam: float = 0.0,
    k_reg: int = 0,
    randomized: bool = True,
    seed: int = SEED,
) -> ConformalCalibration:
    """Calibrate on the validation split's (calibrated) probabilities; with ``lesion_ids``, on one photo
    of each lesion."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = np.arange(len(labels)) if lesion_ids is None else one_per_lesion(lesion_ids, seed)
    u = rng.random(len(keep)) if randomized else None
    scores = conformity_scores(probs[keep], lam, k_reg, u)[np.arange(len(keep)), labels[keep]]
    return ConformalCalibration(
        qhat=conformal_quantile(scores, alpha),
        alpha=float(alpha),
        lam=float(lam),
        k_reg=int(k_reg),
        randomized=bool(randomized),
        n_calibration=len(keep),
        grouping="image" if lesion_ids is None else "one_per_lesion",
    )


def image_sets(probs: np.ndarray, calibration: ConformalCalibration, image_ids: Sequence[str]) -> np.ndarray:
    """:func:`prediction_sets` with each image's u seeded by its image id (``predict``: the file name without
    its extension): an image gets the same set in ``predict`` and in ``evaluate``'s coverage, whatever
    batch, order or split it comes in."""
    u = np.array([np.random.default_rng(zlib.crc32(str(image_id).encode())).random() for image_id in image_ids])
    return prediction_sets(probs, calibration, u=u)


def prediction_sets(
    probs: np.ndarray,
    calibration: ConformalCalibration,
    seed: int = SEED,
    allow_empty: bool = False,
    u: np.ndarray | None = None,
) -> np.ndarray:
    """(images, classes) boolean: the classes in each image's set. A randomised calibration draws each
    image's u with ``seed`` unless ``u`` (images,) in [0, 1) is given."""
    probs = np.asarray(probs, dtype=np.float64)
    if not calibration.randomized:
        u = None
    elif u is None:
        u = np.random.default_rng(seed).random(len(probs))
    sets = conformity_scores(probs, calibration.lam, calibration.k_reg, u) <= calibration.qhat
    if not allow_empty:
        sets[np.arange(len(probs)), probs.argmax(axis=1)] = True
    return sets


def set_labels(sets: np.ndarray, classes: Sequence[str] = CLASSES) -> list[str]:
    """Each set as text for a CSV column: its classes in class order, joined by '|'."""
    return ["|".join(name for name, kept in zip(classes, row, strict=True) if kept) for row in sets]


def set_coverage(
    sets: np.ndarray, labels: np.ndarray, lesion_ids: Sequence | None = None, classes: Sequence[str] = CLASSES
) -> dict[str, float]:
    """On test: ``coverage`` (images whose set holds the true class), ``coverage_lesion`` (the mean over
    lesions of the share of their photos covered: each lesion counts once, the unit of the guarantee),
    ``mean_set_size``, ``empty_sets`` and ``coverage_<class>`` for each class with test images."""
    sets, labels = np.asarray(sets, dtype=bool), np.asarray(labels)
    covered = sets[np.arange(len(labels)), labels]
    out = {
        "coverage": float(covered.mean()),
        "mean_set_size": float(sets.sum(axis=1).mean()),
        "empty_sets": float((sets.sum(axis=1) == 0).mean()),
    }
    if lesion_ids is not None:
        _, lesion = np.unique(np.asarray(lesion_ids, dtype=str), return_inverse=True)
        per_lesion = np.bincount(lesion, weights=covered) / np.bincount(lesion)
        out["coverage_lesion"] = float(per_lesion.mean())
    for k, name in enumerate(classes):
        if (labels == k).any():
            out[f"coverage_{name}"] = float(covered[labels == k].mean())
    return out
