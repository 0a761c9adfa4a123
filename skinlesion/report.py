"""The comparison report of a sweep: one ranked table over every run in a folder, and its plots.

    python -m skinlesion.report outputs/train/multiruns/<sweep> [--rank-by test/balanced_acc]

Hydra calls :class:`MultirunReport` when a training multirun ends, so every sweep folder gets its
report without asking. A run is a folder with a ``metrics.json`` (``train`` writes one whether the run
completed or failed); a job folder that Hydra created but that has no ``metrics.json`` was killed or is
still running, and is listed as failed too. Runs whose overrides differ only in ``seed`` form one row,
reported as mean ± standard deviation.

Metrics come from a run's test split when it has one, else from its validation split (the ``split``
column says which); ``--rank-by val/balanced_acc`` picks the split explicitly.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from skinlesion import cli
from skinlesion.errors import ConfigError, DataError, SkinLesionError
from skinlesion.labels import CLASSES
from skinlesion.models.metrics import HEADLINE_METRICS
from skinlesion.plots import plot_confusion_grid, plot_metric_bars, plot_roc_grid
from skinlesion.runfolder.files import HYDRA_DIR, METRICS_FILE, find_runs, read_json
from skinlesion.scoring.artifacts import split_interval_method
from skinlesion.scoring.bootstrap import BOOTSTRAP_METRICS, LEVEL, N_RESAMPLES, Resamples, paired_difference

log = logging.getLogger(__name__)

DEFAULT_RANK_BY = "balanced_acc"
RUNS_CSV, SUMMARY_CSV, SUMMARY_MD = "runs.csv", "summary.csv", "summary.md"
METRICS_PNG, CONFUSION_PNG, ROC_PNG = "summary_metrics.png", "summary_confusion.png", "summary_roc.png"
# Lesion-bootstrap intervals of a single run's score, and rank 1 minus each other configuration, paired;
# what they resampled (lesion, or image where the split names no lesions) and why.
INTERVALS = tuple(f"{m}_ci_{end}" for m in BOOTSTRAP_METRICS for end in ("low", "high"))
INTERVAL_METHOD = ("ci_resampled", "ci_reason")
PAIRED = ("diff_vs_first", "diff_ci_low", "diff_ci_high", "p_first_better")
NOT_FINISHED = "no metrics.json: the job was killed before it finished, or is still running"
RECALLS = tuple(f"recall_{c}" for c in CLASSES)
# Averaged over seeds; the first ones also get a ±std column.
SCORES = (*HEADLINE_METRICS, *RECALLS, "val_loss", "epochs", "train_time_s", "images_per_s")
# What stage 2 trained: its share of the backbone's parameters and their count (the fairness check).
CONSTANTS = ("image_size", "params_m", "stage2_share", "stage2_params_m")
LOWER_IS_BETTER = ("loss", "nll", "ece", "time")
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
    "images_per_s": "images/s",
    "runs": "runs",
}


@dataclass
class Report:
    runs: pd.DataFrame  # one row per run, failed ones with their error
    summary: pd.DataFrame  # one row per configuration (seeds pooled), ranked
    folder: Path

    @property
    def failed(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] != "completed"]


# ---- collecting runs ---------------------------------------------------------------------------------
def _overrides(run: Path) -> list[str]:
    path = run / HYDRA_DIR / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def _backbone_from_overrides(overrides: Sequence[str]) -> str | None:
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), None)


def pick_split(metrics: dict, prefer: str | None) -> str:
    if prefer:
        return prefer
    return "test" if any(k.startswith("test/") for k in metrics) else "val"


def run_row(run: Path, root: Path, prefer: str | None = None) -> dict[str, Any]:
    """One run's line of the table: its headline metrics on the chosen split, or its error."""
    overrides = _overrides(run)
    row: dict[str, Any] = {
        "run": str(run.relative_to(root)) if run != root else run.name,
        "run_dir": str(run),
        "overrides": tuple(o for o in overrides if not o.startswith("seed=")),
        "backbone": _backbone_from_overrides(overrides),
        "seed": None,
    }
    if not (run / METRICS_FILE).is_file():
        return row | {"status": "failed", "error": NOT_FINISHED}
    data = read_json(run / METRICS_FILE)
    row |= {"status": data.get("status", "unknown"), "seed": data.get("seed")}
    row["backbone"] = data.get("backbone") or row["backbone"]
    if row["status"] != "completed":
        return row | {"error": data.get("error", "unknown error")}
    metrics = data.get("metrics", {})
    stages = data.get("finetune") or {}  # runs written before the stage-2 share was recorded have none
    split = pick_split(metrics, prefer)
    row |= {
        "split": split,
        "image_size": data.get("image_size"),
        "params_m": data["params_total"] / 1e6 if data.get("params_total") else None,
        "stage2_share": stages.get("stage2_backbone_share"),
        "stage2_params_m": stages["stage2_backbone_params"] / 1e6 if stages.get("stage2_backbone_params") else None,
        **{name: metrics.get(f"{split}/{name}") for name in (*HEADLINE_METRICS, *RECALLS, *INTERVALS)},
        "val_loss": metrics.get("val/loss"),  # of the reported (best) weights
        "epochs": data.get("epochs"),
        "best_epoch": data.get("best_epoch"),
        "train_time_s": data.get("train_time_s"),
        "images_per_s": data.get("train_images_per_s"),
        **_interval_method(data, run, split),
        "error": None,
    }
    return row


def _interval_method(data: dict, run: Path, split: str) -> dict[str, str | None]:
    """``ci_resampled``/``ci_reason`` of a run's split: from metrics.json, else from its predictions CSV."""
    method = data.get("interval_method", {}).get(split)
    if method is None and (predictions := _predictions(str(run), split)) is not None:
        method = split_interval_method(predictions)
    method = method or {}
    return {"ci_resampled": method.get("resampled"), "ci_reason": method.get("reason")}


def collect_runs(folder: Path, prefer: str | None = None) -> pd.DataFrame:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder; pass a sweep folder such as outputs/train/multiruns/<sweep>")
    runs = find_runs(folder)
    if not runs:
        raise DataError(
            f"{folder}: no training runs found (folders with {METRICS_FILE}); pass a folder written by "
            "python -m skinlesion.train, e.g. outputs/train/multiruns/<sweep>"
        )
    table = pd.DataFrame([run_row(run, folder, prefer) for run in runs])
    # The "config" of a run: its overrides minus the model, the seed and what all runs share.
    common = set.intersection(*(set(o) for o in table["overrides"]))
    table["config"] = [
        " ".join(o for o in overrides if o not in common and not o.startswith("model="))
        for overrides in table["overrides"]
    ]
    first = ["run", "status", "backbone", "config", "seed"]
    return table[first + [c for c in table.columns if c not in (*first, "error")] + ["error"]]


# ---- the summary -------------------------------------------------------------------------------------
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


def completed_runs(runs: pd.DataFrame, row: pd.Series) -> pd.DataFrame:
    """The completed runs (seeds) behind one row of the summary."""
    same = (runs["backbone"] == row["backbone"]) & (runs["config"] == row["config"])
    return runs[same & (runs["status"] == "completed")]


def _predictions(run_dir: str, split: str) -> pd.DataFrame | None:
    path = Path(run_dir) / f"predictions_{split}.csv"
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype={"image_id": str, "lesion_id": str}, keep_default_na=False)


def _prob_columns(predictions: pd.DataFrame) -> list[str]:
    """``prob_<class>`` columns, in the run's class order."""
    return [c for c in predictions.columns if c.startswith("prob_")]


def _class_indices(names: pd.Series, prob_columns: list[str]) -> np.ndarray:
    """Class names (``true``/``pred`` columns) as indices into ``prob_columns``."""
    return names.map({c.removeprefix("prob_"): i for i, c in enumerate(prob_columns)}).to_numpy()


def compare_with_first(summary: pd.DataFrame, runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rank 1 minus each other configuration on the same images, with a paired lesion-bootstrap interval.

    Only configurations of one run each are paired (several seeds are compared by their spread), and only
    on the same split's same images; the others keep empty columns.
    """
    summary = summary.assign(**{name: math.nan for name in PAIRED})
    single = summary[summary["rank"].notna() & (summary["runs"] == 1)]
    if metric not in BOOTSTRAP_METRICS or len(single) < 2 or single["rank"].iloc[0] != 1:
        return summary
    first = single.iloc[0]
    reference = _predictions(completed_runs(runs, first)["run_dir"].iloc[0], first["split"])
    if reference is None or "lesion_id" not in reference:  # runs written before lesion ids were recorded
        return summary
    probs = _prob_columns(reference)
    labels, preds = _class_indices(reference["true"], probs), _class_indices(reference["pred"], probs)
    resamples = Resamples.draw(reference["lesion_id"])
    for position, row in single.iloc[1:].iterrows():
        other = _predictions(completed_runs(runs, row)["run_dir"].iloc[0], row["split"])
        if row["split"] != first["split"] or other is None or len(other) != len(reference):
            continue
        if _prob_columns(other) != probs:  # other classes: nothing to pair
            continue
        paired = reference[["image_id"]].merge(other[["image_id", "pred"]], on="image_id", how="left")
        if paired["pred"].isna().any():  # not the same images
            continue
        difference = paired_difference(
            labels, preds, _class_indices(paired["pred"], probs), resamples, len(probs), metric
        )
        summary.loc[position, list(PAIRED)] = [difference[k] for k in ("difference", "low", "high", "p_a_better")]
    return summary


# ---- writing -----------------------------------------------------------------------------------------
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
    digits = 1 if name in ("train_time_s", "images_per_s", "params_m", "stage2_params_m", *INTEGERS) else 4
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if has_std else "")


def _markdown_table(frame: pd.DataFrame, columns: Sequence[str], headers: dict[str, str]) -> str:
    lines = [
        "| " + " | ".join(headers.get(c, c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(row, c) for c in columns) + " |" for _, row in frame.iterrows()]
    return "\n".join(lines)


def _label(row: pd.Series) -> str:
    return f"{row['backbone']} {row['config']}".strip()


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


def _certainty_section(done: pd.DataFrame, metric: str, names: list[str]) -> list[str]:
    """How far each score could move, and whether rank 1 is really ahead: lesion-bootstrap intervals."""
    if metric not in BOOTSTRAP_METRICS or done[f"{metric}_ci_low"].isna().all():
        return []
    percent = f"{LEVEL:.0%}"
    paired = done["diff_vs_first"].notna().any()
    header = [*(HEADERS.get(n, n) for n in names), HEADERS.get(metric, metric), f"{percent} CI"]
    mixed = done["ci_resampled"].dropna().nunique() > 1
    header += ["resampled"] if mixed else []
    text = _resampling_text(done)
    if paired:
        header += ["rank 1 minus this", f"{percent} CI", "P(rank 1 better)"]
        text += (
            f" The difference is rank 1's {metric} minus this row's on the same images, resampled in pairs; when "
            "its interval includes 0 this split cannot tell the two apart. P counts the resamples rank 1 wins "
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
        columns += ["val_loss", "epochs", "train_time_s", "images_per_s", "runs"]
        lines += [_markdown_table(done, columns, HEADERS), ""]
        lines += _fairness_line(done)
        lines += _certainty_section(done, metric, names)
        lines += ["## Recall per class", ""]
        recall_headers = {r: r.removeprefix("recall_") for r in RECALLS}
        lines += [_markdown_table(done, [*names, *RECALLS], recall_headers), ""]
        lines += ["## Plots", "", f"![headline metrics]({METRICS_PNG})", "", f"![confusion matrices]({CONFUSION_PNG})"]
        lines += ["", f"![one-vs-rest ROC curves]({ROC_PNG})", ""]
    if not report.failed.empty:
        lines += ["## Failed runs", "", _markdown_table(report.failed, ["run", "backbone", "seed", "error"], {}), ""]
    return "\n".join(lines)


def _pooled_predictions(runs: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    frames = [frame for r in runs["run_dir"] if (frame := _predictions(r, split)) is not None]
    if not frames:
        return None
    frame = pd.concat(frames, ignore_index=True)
    columns = _prob_columns(frame)
    return _class_indices(frame["true"], columns), frame[columns].to_numpy()


def _pooled_confusion(runs: pd.DataFrame, split: str) -> np.ndarray | None:
    files = [p for p in (Path(r) / f"confusion_matrix_{split}.csv" for r in runs["run_dir"]) if p.is_file()]
    if not files:
        return None
    return sum(pd.read_csv(p, index_col=0).to_numpy() for p in files)


def error_bars(done: pd.DataFrame, metric: str) -> np.ndarray:
    """(2, rows) distances below and above each row's score: ±std over seeds where several ran, else the
    bootstrap interval of the one run (for the metrics that have one), else NaN (no bar)."""
    score = pd.to_numeric(done[metric], errors="coerce").to_numpy(dtype=float)
    std = pd.to_numeric(done[f"{metric}_std"], errors="coerce").to_numpy(dtype=float)
    below, above = std.copy(), std.copy()
    if f"{metric}_ci_low" in done:
        one_run = np.isnan(std)
        below[one_run] = score[one_run] - pd.to_numeric(done[f"{metric}_ci_low"], errors="coerce").to_numpy()[one_run]
        above[one_run] = pd.to_numeric(done[f"{metric}_ci_high"], errors="coerce").to_numpy()[one_run] - score[one_run]
    return np.clip(np.stack([below, above]), 0, None)  # NaN: no bar


def write_plots(report: Report, out_dir: Path) -> None:
    """Headline metrics per configuration, confusion matrices and ROC curves (seeds pooled)."""
    done = report.summary[report.summary["status"] == "completed"]
    if done.empty:
        return
    labels = [_label(row) for _, row in done.iterrows()]
    means = done[list(HEADLINE_METRICS)].set_axis(labels)
    errors = {metric: error_bars(done, metric) for metric in HEADLINE_METRICS}
    title = f"{report.folder.name} ({'/'.join(set(done['split']))})"
    unit = "/".join(sorted(set(done["ci_resampled"].dropna()))) or "lesion"
    note = f"error bars: ±std over seeds, else the {LEVEL:.0%} {unit}-bootstrap interval (acc, bal. acc, F1)"
    plot_metric_bars(means, errors, out_dir / METRICS_PNG, title=title, note=note)
    matrices, curves = {}, {}
    for label, (_, row) in zip(labels, done.iterrows(), strict=True):
        members = completed_runs(report.runs, row)
        split = members["split"].iloc[0]
        name = f"{label} ({split}, {len(members)} runs pooled)" if len(members) > 1 else f"{label} ({split})"
        if (counts := _pooled_confusion(members, split)) is not None:
            matrices[name] = counts
        if (pooled := _pooled_predictions(members, split)) is not None:
            curves[name] = pooled
    if matrices:
        plot_confusion_grid(matrices, CLASSES, out_dir / CONFUSION_PNG)
    if curves:
        plot_roc_grid(curves, CLASSES, out_dir / ROC_PNG)


def write_report(folder: Path, rank_by: str = DEFAULT_RANK_BY, out_dir: Path | None = None) -> Report:
    """Collect, summarise and write ``runs.csv``, ``summary.csv``, ``summary.md`` and the plots."""
    prefer, _ = parse_rank_by(rank_by)
    folder = Path(folder).expanduser().resolve()
    out_dir = Path(out_dir) if out_dir else folder
    runs = collect_runs(folder, prefer)
    summary = compare_with_first(summarize(runs, rank_by), runs, parse_rank_by(rank_by)[1])
    report = Report(runs=runs, summary=summary, folder=folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs.drop(columns=["run_dir", "overrides"]).to_csv(out_dir / RUNS_CSV, index=False)
    report.summary.to_csv(out_dir / SUMMARY_CSV, index=False)
    write_plots(report, out_dir)
    (out_dir / SUMMARY_MD).write_text(summary_markdown(report, rank_by))
    return report


class MultirunReport(Callback):
    """Hydra callback (``hydra.callbacks.report`` in conf/train.yaml): the report of a sweep once it ends.

    Hydra calls ``on_multirun_end`` only when no job raised, which is why jobs return NaN on failure
    (:func:`skinlesion.cli.run_task`); the failed ones are handed to :mod:`skinlesion.cli`, which ends the
    command with a non-zero exit status after this report is written.
    """

    def __init__(self, rank_by: str = DEFAULT_RANK_BY) -> None:
        self.rank_by = rank_by

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        report = write_report(folder, self.rank_by)
        for _, row in report.failed.iterrows():
            cli.record_failed_job(row["run_dir"], row["error"])
        log.info("comparison report: %s", folder / SUMMARY_MD)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m skinlesion.report",
        description="Rank every training run in a folder (a sweep) and write summary.csv, summary.md and plots.",
    )
    parser.add_argument("folder", type=Path, help="a folder of runs, e.g. outputs/train/multiruns/<sweep>")
    parser.add_argument(
        "--rank-by",
        default=DEFAULT_RANK_BY,
        help="a metric column, optionally with the split to report: balanced_acc (default), test/f1_macro, ...",
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="where to write the report (default: folder)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.folder, args.rank_by, args.output_dir)
    except SkinLesionError as err:
        cli.fail(str(err))
    print(summary_markdown(report, args.rank_by))
    print(f"report: {(args.output_dir or report.folder) / SUMMARY_MD}")


if __name__ == "__main__":
    main()
