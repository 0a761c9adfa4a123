"""The summary of a sweep: one row per configuration (seeds pooled), ranked, rank 1 paired with the rest.

Several seeds of one configuration are reported as mean ± standard deviation. A configuration of a
single run keeps its lesion-bootstrap interval, and is compared with rank 1 on the same images by a
paired bootstrap (:class:`skinlesion.scoring.paired.PairedReference`), which says whether the split
can tell the two apart at all. An ablation names its baseline configuration instead (``reference``), so
that every option is paired with the default recipe rather than with whichever run came first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.errors import ConfigError
from skinlesion.models.metrics import HEADLINE_METRICS
from skinlesion.reporting.collect import INTERVALS, RECALLS, run_predictions
from skinlesion.scoring.bootstrap import BOOTSTRAP_METRICS
from skinlesion.scoring.paired import PairedReference

DEFAULT_RANK_BY = "balanced_acc"
# What a single run's intervals resampled (lesion, or image where the split names no lesions) and why;
# the reference (rank 1, or the configuration named by ``reference``) minus each other configuration, paired.
INTERVAL_METHOD = ("ci_resampled", "ci_reason")
PAIRED = ("diff_vs_first", "diff_ci_low", "diff_ci_high", "p_first_better")
# Averaged over seeds; the first ones also get a ±std column.
SCORES = (*HEADLINE_METRICS, *RECALLS, "val_loss", "epochs", "train_time_s", "train_images_per_s")
# What stage 2 trained: its share of the backbone's parameters and their count (the fairness check).
CONSTANTS = ("image_size", "params_m", "stage2_share", "stage2_params_m")
LOWER_IS_BETTER = ("loss", "nll", "ece", "time")


@dataclass
class Report:
    """A sweep's report: what :mod:`~skinlesion.reporting.markdown` and :mod:`~skinlesion.reporting.plots` show."""

    runs: pd.DataFrame  # one row per run, failed ones with their error
    summary: pd.DataFrame  # one row per configuration (seeds pooled), ranked
    folder: Path
    trials: pd.DataFrame | None = None  # an Optuna search's trials (skinlesion.reporting.search), if any
    reference: str | None = None  # the configuration the others are paired with; None: rank 1

    @property
    def failed(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] != "completed"]


def parse_rank_by(rank_by: str) -> tuple[str | None, str]:
    """``test/balanced_acc`` -> ("test", "balanced_acc"); ``balanced_acc`` -> (None, "balanced_acc")."""
    split, _, name = rank_by.rpartition("/")
    if split not in ("", "val", "test"):
        raise ConfigError(f"rank_by='{rank_by}': the split must be val or test, e.g. test/balanced_acc")
    if name not in SCORES:
        raise ConfigError(f"rank_by='{rank_by}' is not a report column; choose one of {', '.join(SCORES)}")
    return split or None, name


def lower_is_better(name: str) -> bool:
    return any(word in name for word in LOWER_IS_BETTER)


def summarize(runs: pd.DataFrame, rank_by: str = DEFAULT_RANK_BY) -> pd.DataFrame:
    """One row per (backbone, config): means over seeds, ``<metric>_std`` when several ran, ranked."""
    _, metric = parse_rank_by(rank_by)
    rows = []
    for (backbone, config), group in runs.groupby(["backbone", "config"], sort=False, dropna=False):
        done = group[group["status"] == "completed"]
        row: dict[str, Any] = {
            "backbone": backbone,
            "config": config,
            "runs": len(done),
            "failed": len(group) - len(done),
            "seeds": ",".join(str(s) for s in sorted(group["seed"].dropna().astype(int).unique())),
            "status": "completed" if len(done) else "failed",
        }
        if done.empty:
            rows.append(row | {"error": group["error"].iloc[0]})
            continue
        row["split"] = "/".join(sorted(set(done["split"])))
        for name in (*CONSTANTS, *INTERVAL_METHOD):
            row[name] = done[name].iloc[0]
        for name in SCORES:
            values = pd.to_numeric(done[name], errors="coerce")
            row[name] = values.mean()
            row[f"{name}_std"] = values.std(ddof=1) if len(done) > 1 else math.nan
        row["flagged_subgroups"] = pooled_flags(done["flagged_subgroups"])
        for name in INTERVALS:  # of one run's test images; several seeds have their std instead
            row[name] = pd.to_numeric(done[name], errors="coerce").iloc[0] if len(done) == 1 else math.nan
        rows.append(row)
    summary = pd.DataFrame(rows)
    if metric not in summary:
        summary[metric] = math.nan
    summary["_failed"] = summary["status"] != "completed"
    summary = summary.sort_values(
        ["_failed", metric], ascending=[True, lower_is_better(metric)], na_position="last", kind="stable"
    ).drop(columns="_failed")
    ranked = summary["status"].eq("completed") & summary[metric].notna()
    summary.insert(0, "rank", pd.Series(np.arange(1, len(summary) + 1), index=summary.index).where(ranked))
    if "error" not in summary:
        summary["error"] = None
    return summary[[c for c in summary.columns if c != "error"] + ["error"]].reset_index(drop=True)


def pooled_flags(flags: pd.Series) -> str | None:
    """One run's flagged subgroups as they are; several seeds': each subgroup with how many seeds flagged it
    (a flag in one seed of three is weaker evidence than in all). None when no run was audited."""
    audited = [f for f in flags if isinstance(f, str)]
    if not audited:
        return None
    if len(flags) == 1:
        return audited[0]
    counts = pd.Series([g for f in audited for g in f.split("; ") if g]).value_counts()
    return "; ".join(f"{group} ({n}/{len(audited)} seeds)" for group, n in counts.items())


def completed_runs(runs: pd.DataFrame, row: pd.Series) -> pd.DataFrame:
    """The completed runs (seeds) behind one row of the summary."""
    same = (runs["backbone"] == row["backbone"]) & (runs["config"] == row["config"])
    return runs[same & (runs["status"] == "completed")]


def compare_with_first(
    summary: pd.DataFrame, runs: pd.DataFrame, metric: str, reference: str | None = None
) -> pd.DataFrame:
    """The reference minus each other configuration on the same images, with a paired lesion-bootstrap
    interval. The reference is rank 1, or the configuration whose ``config`` is ``reference`` (an ablation's
    baseline, e.g. ``ablation=baseline``).

    Only configurations of one run each are paired (several seeds are compared by their spread), and only
    on the same split's same images; the others keep empty columns.
    """
    summary = summary.assign(**{name: math.nan for name in PAIRED})
    single = summary[summary["rank"].notna() & (summary["runs"] == 1)]
    if reference is not None:
        single = _reference_first(summary, single, reference)
    if metric not in BOOTSTRAP_METRICS or len(single) < 2 or (reference is None and single["rank"].iloc[0] != 1):
        return summary
    first = single.iloc[0]
    first_predictions = run_predictions(completed_runs(runs, first)["run_dir"].iloc[0], first["split"])
    if first_predictions is None or "lesion_id" not in first_predictions:  # runs from before lesion ids
        return summary
    pairing = PairedReference.of(first_predictions)
    for position, row in single.iloc[1:].iterrows():
        other = run_predictions(completed_runs(runs, row)["run_dir"].iloc[0], row["split"])
        if row["split"] != first["split"] or other is None:
            continue
        difference = pairing.difference(other, metric, reference_first=True)
        if difference is not None:  # None: other images or classes, nothing to pair
            summary.loc[position, list(PAIRED)] = [difference[k] for k in ("difference", "low", "high", "p_a_better")]
    return summary


def _reference_first(summary: pd.DataFrame, single: pd.DataFrame, reference: str) -> pd.DataFrame:
    """``single`` with the reference configuration's row first; refused when the sweep has no such row."""
    configs = summary["config"].fillna("").astype(str)
    if configs.nunique() < 2:  # one configuration (a sweep of seeds, or of the baseline alone): nothing to pair
        return single.iloc[:0]
    if reference not in set(configs):
        raise ConfigError(
            f"reference='{reference}': no configuration of this folder is called that; its configurations are "
            f"{', '.join(repr(c) for c in configs.unique())} (the overrides that differ between its runs)"
        )
    if reference not in set(single["config"].fillna("").astype(str)):
        return single.iloc[:0]  # the reference failed or has several seeds: nothing is paired with it
    is_reference = single["config"].fillna("").astype(str) == reference
    return pd.concat([single[is_reference], single[~is_reference]])
