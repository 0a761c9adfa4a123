"""Subgroup audit: does the model work as well for each sex, age band, body site, clinic and kind of
ground truth as on the whole split?

For each subgroup of each metadata column: its images and lesions, balanced accuracy, melanoma recall and
macro AUROC (one-vs-rest, over the classes the subgroup holds), each with a lesion-bootstrap interval, and
the paired difference to the whole split.

Pairing. One set of lesion resamples of the whole split serves every subgroup: in resample r the subgroup
is scored on the photos of the drawn lesions that belong to it, each counted as often as its lesion was
drawn, and the whole split on all drawn photos. The difference (subgroup minus whole) is taken resample by
resample, so the variation they share (the subgroup is part of the whole) cancels, as in
:func:`skinlesion.scoring.bootstrap.paired_difference`. The subgroup's own interval comes from the same
resamples, so its size varies between resamples as it would on another test set drawn like this one.

Flag. A subgroup is flagged on a metric when its whole interval lies below the whole-split figure. With
some thirty subgroups and three metrics a flag can arise by chance; it says where to look, not a finding.
The paired difference's interval (``*_diff_low/high``) is the sharper test and is reported beside it.

Pooling. Body sites with fewer than ``min_site_lesions`` lesions in the split are pooled into ``other``
(their names in ``pooled``, the rule in the notes): their intervals would be too wide to read.
``unknown`` is not a site and is never pooled. Ages fall in :data:`AGE_BANDS`; empty ages in ``missing``.

Bad input gives a note (returned and logged), never an exception: a column the metadata lacks is
skipped; values outside HAM10000's vocabulary (:data:`EXPECTED_VALUES`) are audited as they are, with a
note; an age that is not a number from 0 to 120 counts as missing, with a note.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from skinlesion.clinical.auroc import image_weights, macro_auroc
from skinlesion.data.layouts import HAM_LOCALIZATIONS, HAM_SEXES, METADATA_COLUMNS
from skinlesion.data.metadata import AGE_RANGE
from skinlesion.labels import CLASSES
from skinlesion.scoring.bootstrap import (
    LEVEL,
    N_RESAMPLES,
    SEED,
    Resamples,
    percentile_interval,
    recall_per_class,
    scores_from_confusions,
)

log = logging.getLogger(__name__)

AUDIT_COLUMNS = METADATA_COLUMNS  # the columns the data layouts carry into the records
AUDIT_METRICS = ("balanced_acc", "recall_mel", "auroc_macro")
AUDIT_METRIC_NAMES = {
    "balanced_acc": "balanced accuracy",
    "recall_mel": "melanoma recall",
    "auroc_macro": "macro AUROC",
}
AGE_BANDS = ((0, 30, "<30"), (30, 45, "30-44"), (45, 60, "45-59"), (60, 75, "60-74"), (75, 121, ">=75"))
MIN_SITE_LESIONS = 20
MISSING = "missing"
OTHER = "other"
UNKNOWN_SITE = "unknown"
EXPECTED_VALUES = {
    "sex": set(HAM_SEXES),
    "dataset": {"vidir_molemax", "vidir_modern", "rosendahl", "vienna_dias"},
    "dx_type": {"histo", "follow_up", "consensus", "confocal"},
    "localization": set(HAM_LOCALIZATIONS),
}
TABLE_COLUMNS = [
    "column",
    "subgroup",
    "n_images",
    "n_lesions",
    *(
        f"{metric}{suffix}"
        for metric in AUDIT_METRICS
        for suffix in ("", "_low", "_high", "_diff", "_diff_low", "_diff_high", "_flagged")
    ),
    "flagged",
    "pooled",
]


class SubgroupAudit(NamedTuple):
    """One row per subgroup (the first, ``all``, is the whole split) and the notes on the metadata."""

    table: pd.DataFrame
    notes: list[str]


def _text(values: pd.Series) -> pd.Series:
    """Values as stripped lower-case text; empty or NaN as :data:`MISSING`."""
    text = values.astype("string").str.strip().str.lower().fillna("")
    return text.mask(text.isin(["", "nan", "none"]), MISSING).astype(object)


def _warn(note: str) -> str:
    log.warning(note)
    return note


def _examples(values: pd.Series) -> str:
    counts = values.value_counts()
    shown = ", ".join(f"'{value}' ({n})" for value, n in counts.head(5).items())
    return shown + (f" and {len(counts) - 5} more" if len(counts) > 5 else "")


def age_bands(ages: pd.Series) -> tuple[pd.Series, list[str]]:
    """Each image's age band (:data:`AGE_BANDS`, ``missing`` where empty or not an age), and a note on
    the values that are not ages."""
    text = _text(ages)
    years = pd.to_numeric(text.where(text != MISSING), errors="coerce")
    wrong = (text != MISSING) & (years.isna() | (years < AGE_RANGE[0]) | (years > AGE_RANGE[1]))
    bands = pd.Series(MISSING, index=ages.index, dtype=object)
    for low, high, name in AGE_BANDS:
        bands[(years >= low) & (years < high) & ~wrong] = name
    notes = []
    if wrong.any():
        notes.append(
            _warn(
                f"age: {int(wrong.sum())} value(s) are not ages from {AGE_RANGE[0]:g} to {AGE_RANGE[1]:g} "
                f"and count as {MISSING}: {_examples(text[wrong])}"
            )
        )
    return bands, notes


def pool_sites(sites: pd.Series, lesion_ids: pd.Series, min_lesions: int) -> tuple[pd.Series, list[str], str]:
    """Sites with fewer than ``min_lesions`` lesions renamed :data:`OTHER`; the rule as a note; the pooled
    sites (for the ``other`` row)."""
    lesions = lesion_ids.groupby(sites).nunique()
    small = [s for s, n in lesions.items() if n < min_lesions and s not in (UNKNOWN_SITE, MISSING, OTHER)]
    if not small:
        rule = f"localization: no site has fewer than {min_lesions} lesions in this split, none pooled"
        log.info(rule)
        return sites, [rule], ""
    counts = ", ".join(f"{s} ({lesions[s]})" for s in sorted(small))
    rule = f"localization: sites with fewer than {min_lesions} lesions in this split pooled into '{OTHER}': {counts}"
    log.info(rule)
    return sites.mask(sites.isin(small) | (sites == OTHER), OTHER), [rule], ", ".join(sorted(small))


def subgroups_of(
    metadata: pd.DataFrame, column: str, lesion_ids: pd.Series, min_site_lesions: int = MIN_SITE_LESIONS
) -> tuple[pd.Series | None, list[str], str]:
    """Each image's subgroup in ``column`` (None when the metadata lacks it), the notes, and the sites
    pooled into ``other``."""
    if column not in metadata:
        return None, [_warn(f"{column}: not in the metadata, not audited")], ""
    if column == "age":
        bands, notes = age_bands(metadata[column])
        return bands, notes, ""
    values, notes = _text(metadata[column]), []
    expected = EXPECTED_VALUES.get(column)
    if expected is not None:
        unexpected = ~values.isin(expected | {MISSING})
        if unexpected.any():
            notes.append(
                _warn(
                    f"{column}: {int(unexpected.sum())} value(s) outside HAM10000's "
                    f"({', '.join(sorted(expected))}), audited as they are: {_examples(values[unexpected])}"
                )
            )
    if values.eq(MISSING).all():
        return None, [*notes, _warn(f"{column}: every value is empty, not audited")], ""
    if column == "localization":
        values, rule, pooled = pool_sites(values, lesion_ids, min_site_lesions)
        return values, notes + rule, pooled
    return values, notes, ""


def _scores(
    resamples: Resamples, probs: np.ndarray, labels: np.ndarray, preds: np.ndarray, mask: np.ndarray, mel: int | None
) -> dict[str, np.ndarray]:
    """(resamples,) score of each metric on the images in ``mask``, each counted as often as its lesion
    was drawn; NaN where a resample holds no image the metric needs."""
    restricted = Resamples(resamples.weights, resamples.lesion_of_image[mask])
    confusions = restricted.confusions(labels[mask], preds[mask], probs.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = {"balanced_acc": scores_from_confusions(confusions)["balanced_acc"]}
        recalls = recall_per_class(confusions)
    scores["recall_mel"] = recalls[:, mel] if mel is not None else np.full(len(confusions), np.nan)
    scores["auroc_macro"] = macro_auroc(probs[mask], labels[mask], image_weights(restricted))
    return scores


def subgroup_audit(
    probs: np.ndarray,
    labels: np.ndarray,
    lesion_ids: Sequence,
    metadata: pd.DataFrame | None,
    classes: Sequence[str] = CLASSES,
    columns: Sequence[str] = AUDIT_COLUMNS,
    min_site_lesions: int = MIN_SITE_LESIONS,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> SubgroupAudit:
    """Audit one split; ``metadata`` holds a row per image, in the order of ``probs`` (N x classes).

    A set without metadata (None, or none of ``columns``) gives an empty table and a note.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    lesions = pd.Series(np.asarray(lesion_ids, dtype=str))
    if metadata is None or not set(columns) & set(metadata.columns):
        note = "no subgroup metadata in this set (" + ", ".join(columns) + "), subgroup audit skipped"
        log.info(note)
        return SubgroupAudit(pd.DataFrame(columns=TABLE_COLUMNS), [note])
    if len(metadata) != len(labels):
        raise ValueError(f"metadata has {len(metadata)} rows for {len(labels)} predictions")
    metadata = metadata.reset_index(drop=True)
    preds = probs.argmax(axis=1)
    mel = list(classes).index("mel") if "mel" in classes else None
    resamples = Resamples.draw(lesions, n_resamples=n_resamples, seed=seed)
    full = Resamples(np.ones((1, resamples.weights.shape[1]), np.float32), resamples.lesion_of_image)

    def measure(mask: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The scores of these images on the full sample, and on each resample."""
        return _scores(full, probs, labels, preds, mask, mel), _scores(resamples, probs, labels, preds, mask, mel)

    everything = np.ones(len(labels), dtype=bool)
    whole, whole_resampled = measures = measure(everything)

    def row(column: str, subgroup: str, mask: np.ndarray, measured: tuple, pooled: str = "") -> dict:
        observed, resampled = measured
        out = {"column": column, "subgroup": subgroup, "n_images": int(mask.sum())}
        out["n_lesions"] = int(lesions[mask].nunique())
        for metric in AUDIT_METRICS:
            value, reference = float(observed[metric][0]), float(whole[metric][0])
            low, high = percentile_interval(resampled[metric], level)
            diff_low, diff_high = percentile_interval(resampled[metric] - whole_resampled[metric], level)
            out |= {metric: value, f"{metric}_low": low, f"{metric}_high": high, f"{metric}_diff": value - reference}
            out |= {f"{metric}_diff_low": diff_low, f"{metric}_diff_high": diff_high}
            out[f"{metric}_flagged"] = bool(high < reference)  # False when NaN: nothing to judge
        out["flagged"] = any(out[f"{metric}_flagged"] for metric in AUDIT_METRICS)
        return out | {"pooled": pooled}

    rows, notes = [row("all", "all", everything, measures)], []
    for column in columns:
        groups, column_notes, pooled = subgroups_of(metadata, column, lesions, min_site_lesions)
        notes += column_notes
        if groups is None:
            continue
        sizes = groups.value_counts()
        if column == "age":
            order = [name for _, _, name in AGE_BANDS]
        else:
            order = sorted(sizes.index, key=lambda g: (g == OTHER, -sizes[g], g))
        order = [g for g in order if g in sizes.index and g != MISSING] + [MISSING] * (MISSING in sizes.index)
        for name in order:
            mask = (groups == name).to_numpy()
            rows.append(row(column, name, mask, measure(mask), pooled if name == OTHER else ""))
    return SubgroupAudit(pd.DataFrame(rows, columns=TABLE_COLUMNS), notes)
