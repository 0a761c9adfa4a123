"""``summary.md``: the ranked table, how sure the ranking is, recall per class, the plots and failed runs.

Presentation only: every number comes from the summary :mod:`skinlesion.reporting.rank` built; this
module decides how a cell reads (± std over seeds, intervals, escaped text) and what the prose says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from skinlesion.models.metrics import HEADLINE_METRICS
from skinlesion.reporting.collect import RECALLS
from skinlesion.reporting.plots import CONFUSION_PNG, METRICS_PNG, ROC_PNG
from skinlesion.reporting.rank import Report, lower_is_better, parse_rank_by
from skinlesion.scoring.bootstrap import BOOTSTRAP_METRICS, LEVEL, N_RESAMPLES

INTEGERS = ("rank", "image_size", "epochs", "runs", "seed")


HEADERS = {
    "rank": "rank",
    "backbone": "backbone",
    "config": "config",
    "image_size": "input",
    "params_m": "params (M)",
    "stage2_share": "stage-2 share",
    "stage2_params_m": "stage-2 params (M)",
    "split": "split",
    "acc": "acc",
    "top3_acc": "top-3",
    "balanced_acc": "bal. acc",
    "f1_macro": "macro F1",
    "auroc_macro": "macro AUROC",
    "val_loss": "val loss",
    "epochs": "epochs",
    "train_time_s": "train time (s)",
    "train_images_per_s": "images/s",
    "runs": "runs",
}


def _cell(row: pd.Series, name: str) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if not isinstance(value, float):
        return str(value).replace("|", "\\|").replace("\n", " ")
    std = row.get(f"{name}_std")
    has_std = isinstance(std, float) and not math.isnan(std)
    if name in INTEGERS and value.is_integer() and not has_std:
        return str(int(value))
    digits = 1 if name in ("train_time_s", "train_images_per_s", "params_m", "stage2_params_m", *INTEGERS) else 4
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if has_std else "")


def _markdown_table(frame: pd.DataFrame, columns: Sequence[str], headers: dict[str, str]) -> str:
    lines = [
        "| " + " | ".join(headers.get(c, c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(row, c) for c in columns) + " |" for _, row in frame.iterrows()]
    return "\n".join(lines)


def _interval_cell(low: float, high: float, signed: bool = False) -> str:
    if math.isnan(low) or math.isnan(high):
        return ""
    return f"[{low:+.4f}, {high:+.4f}]" if signed else f"[{low:.4f}, {high:.4f}]"


def _resampling_text(done: pd.DataFrame) -> str:
    """What the intervals resample: lesions, or images where a split names no lesions (too narrow then)."""
    methods = done.loc[done["ci_resampled"].notna(), ["ci_resampled", "ci_reason"]].drop_duplicates()
    lesions = (
        f"Intervals resample the split's lesions ({N_RESAMPLES:,} times; all photos of a drawn lesion come along)."
    )
    by_image = methods[methods["ci_resampled"] == "image"]
    if by_image.empty:
        return lesions
    reasons = "; ".join(by_image["ci_reason"].dropna().unique())
    text = (
        f"Intervals resample the split's **images**, not lesions ({N_RESAMPLES:,} times): {reasons}. Photos of one "
        "lesion count as independent, so the intervals may be too narrow."
    )
    if len(by_image) < len(methods):
        text = f"{lesions} Where the `resampled` column says image, instead: {text}"
    return text


def _certainty_section(done: pd.DataFrame, metric: str, names: list[str], reference: str | None) -> list[str]:
    """How far each score could move, and whether rank 1 (or the ablation's ``reference``) is really ahead:
    lesion-bootstrap intervals."""
    if metric not in BOOTSTRAP_METRICS or done[f"{metric}_ci_low"].isna().all():
        return []
    percent = f"{LEVEL:.0%}"
    paired = done["diff_vs_first"].notna().any()
    header = [*(HEADERS.get(n, n) for n in names), HEADERS.get(metric, metric), f"{percent} CI"]
    mixed = done["ci_resampled"].dropna().nunique() > 1
    header += ["resampled"] if mixed else []
    text = _resampling_text(done)
    if paired:
        first = f"`{reference}`" if reference is not None else "rank 1"
        header += [f"{first} minus this", f"{percent} CI", f"P({first} better)"]
        text += (
            f" The difference is {first}'s {metric} minus this row's on the same images, resampled in pairs; when "
            f"its interval includes 0 this split cannot tell the two apart. P counts the resamples {first} wins "
            "(ties half)."
        )
    text += " Rows with several seeds are compared by their standard deviation instead."
    lines = ["## How sure is the ranking?", "", text, "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for _, row in done.iterrows():
        cells = [_cell(row, n) for n in names] + [_cell(row, metric)]
        cells.append(_interval_cell(row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]))
        cells += [_cell(row, "ci_resampled")] if mixed else []
        if paired:
            diff = row["diff_vs_first"]
            cells.append("" if math.isnan(diff) else f"{diff:+.4f}")
            cells.append(_interval_cell(row["diff_ci_low"], row["diff_ci_high"], signed=True))
            cells.append("" if math.isnan(row["p_first_better"]) else f"{row['p_first_better']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _fairness_line(done: pd.DataFrame) -> list[str]:
    """How far apart the stage-2 shares are: a comparison is fair when every backbone trained alike."""
    shares = pd.to_numeric(done["stage2_share"], errors="coerce").dropna()
    if shares.empty:
        return []
    return [
        f"Stage 2 trained {shares.min():.1%} to {shares.max():.1%} of each backbone's parameters (a spread of "
        f"{100 * (shares.max() - shares.min()):.1f} points; `stage-2 share`, from `finetune` in each run's "
        "metrics.json).",
        "",
    ]


def _flagged_section(done: pd.DataFrame, names: list[str]) -> list[str]:
    """The subgroups each backbone's clinical audit flagged (interval wholly below the whole split)."""
    if "flagged_subgroups" not in done or done["flagged_subgroups"].isna().all():
        return []
    text = (
        "Subgroups (sex, age band, body site, clinic, ground truth) whose lesion-bootstrap interval lies wholly "
        "below the whole split's balanced accuracy, melanoma recall or macro AUROC, from each run's "
        "`subgroups_<split>.csv`. With some thirty subgroups a flag can arise by chance: it says where to look."
    )
    table = done.assign(
        flagged_subgroups=done["flagged_subgroups"].map(
            lambda f: "not audited" if not isinstance(f, str) else (f or "none")
        )
    )
    headers = {**HEADERS, "flagged_subgroups": "flagged subgroups"}
    return [
        "## Flagged subgroups",
        "",
        text,
        "",
        _markdown_table(table, [*names, "split", "flagged_subgroups"], headers),
        "",
    ]


def summary_markdown(report: Report, rank_by: str) -> str:
    summary, runs = report.summary, report.runs
    done = summary[summary["status"] == "completed"]
    split, metric = parse_rank_by(rank_by)
    splits = sorted(set(done["split"])) if "split" in done else []
    direction = "lower" if lower_is_better(metric) else "higher"
    lines = [
        f"# Backbone comparison: {report.folder.name}",
        "",
        f"{len(runs)} run(s): {int((runs['status'] == 'completed').sum())} completed, {len(report.failed)} failed. "
        f"Metrics on the **{'/'.join(splits) or '-'}** split "
        f"({'as asked' if split else 'test where a run has one, else validation'}); ranked by {metric} "
        f"({direction} is better). Several seeds of one configuration: mean ± standard deviation. "
        "Validation loss is that of the epoch whose weights are reported.",
        "",
    ]
    if not done.empty:
        names = ["rank", "backbone", *(["config"] if done["config"].str.len().any() else [])]
        columns = [*names, "image_size", "params_m", "stage2_share", "stage2_params_m", "split", *HEADLINE_METRICS]
        columns += ["val_loss", "epochs", "train_time_s", "train_images_per_s", "runs"]
        lines += [_markdown_table(done, columns, HEADERS), ""]
        lines += _fairness_line(done)
        lines += _certainty_section(done, metric, names, report.reference)
        lines += ["## Recall per class", ""]
        recall_headers = {r: r.removeprefix("recall_") for r in RECALLS}
        lines += [_markdown_table(done, [*names, *RECALLS], recall_headers), ""]
        lines += _flagged_section(done, names)
        lines += ["## Plots", "", f"![headline metrics]({METRICS_PNG})", "", f"![confusion matrices]({CONFUSION_PNG})"]
        lines += ["", f"![one-vs-rest ROC curves]({ROC_PNG})", ""]
    if not report.failed.empty:
        lines += ["## Failed runs", "", _markdown_table(report.failed, ["run", "backbone", "seed", "error"], {}), ""]
    if report.trials is not None and not report.trials.empty:
        lines += _search_section(report.trials)
    return "\n".join(lines)


def _search_section(trials: pd.DataFrame) -> list[str]:
    """The best trial of each Optuna study in the folder, then every trial, best value first."""
    params = [c for c in trials.columns if c.startswith("params.")]
    shown = trials.copy()  # learning rates need significant digits, not four decimals
    shown[params] = shown[params].map(lambda v: f"{v:.3g}" if isinstance(v, float) else v)
    lines = ["## Search (Optuna)", ""]
    for _, best in shown[shown["best"]].iterrows():
        chosen = ", ".join(f"{c.removeprefix('params.')}={best[c]}" for c in params if pd.notna(best[c]))
        where = f"run {best['run']}" if best["run"] else "run folder not found"
        lines += [f"Best trial of {best['study']}: #{best['trial']}, value {best['value']:.4f} ({where}): {chosen}"]
    ordered = shown.sort_values(["study", "value"], ascending=[True, False], na_position="last")
    headers = {c: c.removeprefix("params.") for c in params}
    lines += ["", _markdown_table(ordered, ["study", "trial", "state", "value", "run", *params], headers), ""]
    return lines
