"""The runs of a folder as one table: a row per run with its headline metrics, or why it failed.

A run is a folder with a ``metrics.json`` (``train`` writes one whether the run completed or failed); a
job folder that Hydra created but that has no ``metrics.json`` was killed or is still running, and is
listed as failed too. A run's "config" is its overrides minus the model, the seed and what every run of
the folder shares, so runs that differ only in ``seed`` can be pooled into one row of the summary.

Metrics come from a run's test split when it has one, else from its validation split (the ``split``
column says which), unless the caller names the split. The run's predictions CSV is read here too, for
the paired comparison and the pooled plots.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from skinlesion.errors import ConfigError, DataError
from skinlesion.inference.predictions import read_predictions
from skinlesion.labels import CLASSES
from skinlesion.models.metrics import HEADLINE_METRICS
from skinlesion.runfolder.files import HYDRA_DIR, METRICS_FILE, find_runs
from skinlesion.runfolder.summary import FAILED, RunSummary
from skinlesion.scoring.artifacts import split_interval_method
from skinlesion.scoring.bootstrap import BOOTSTRAP_METRICS

# Lesion-bootstrap interval of a single run's score on its split.
INTERVALS = tuple(f"{m}_ci_{end}" for m in BOOTSTRAP_METRICS for end in ("low", "high"))
NOT_FINISHED = "no metrics.json: the job was killed before it finished, or is still running"
RECALLS = tuple(f"recall_{c}" for c in CLASSES)


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
    if not RunSummary.exists(run):
        return row | {"status": FAILED, "error": NOT_FINISHED}
    summary = RunSummary.read(run)
    row |= {"status": summary.status, "seed": summary.seed, "backbone": summary.backbone or row["backbone"]}
    if not summary.completed:
        return row | {"error": summary.error or "unknown error"}
    metrics, stages = summary.metrics, summary.finetune  # runs written before the stage-2 share have no finetune
    split = pick_split(metrics, prefer)
    row |= {
        "split": split,
        "image_size": summary.image_size,
        "params_m": summary.params_total / 1e6 if summary.params_total else None,
        "stage2_share": summary.stage2_share,
        "stage2_params_m": stages["stage2_backbone_params"] / 1e6 if stages.get("stage2_backbone_params") else None,
        **{name: metrics.get(f"{split}/{name}") for name in (*HEADLINE_METRICS, *RECALLS, *INTERVALS)},
        "val_loss": metrics.get("val/loss"),  # of the reported (best) weights
        "epochs": summary.epochs,
        "best_epoch": summary.best_epoch,
        "train_time_s": summary.train_time_s,
        "train_images_per_s": summary.train_images_per_s,
        **_interval_method(summary, run, split),
        "flagged_subgroups": _flagged_subgroups(summary, split),
        "error": None,
    }
    return row


def _flagged_subgroups(summary: RunSummary, split: str) -> str | None:
    """The split's subgroups flagged by the clinical audit, '; '-joined ('' for none; None: not audited,
    as in runs written before the audit or on a set without metadata)."""
    found = summary.clinical.get("splits", {}).get(split)
    if not found or f"{split}/subgroups_flagged" not in summary.metrics:
        return None
    return "; ".join(found.get("flagged_subgroups", []))


def _interval_method(summary: RunSummary, run: Path, split: str) -> dict[str, str | None]:
    """``ci_resampled``/``ci_reason`` of a run's split: from metrics.json, else from its predictions CSV."""
    method = summary.interval_method.get(split)
    if method is None and (predictions := run_predictions(str(run), split)) is not None:
        method = split_interval_method(predictions)
    method = method or {}
    return {"ci_resampled": method.get("resampled"), "ci_reason": method.get("reason")}


def collect_runs(folders: Path | Sequence[Path], prefer: str | None = None) -> pd.DataFrame:
    """Every run below one folder, or below several (sweeps to compare): a run reached through two of them,
    one inside the other or named twice, is one row. Run names are relative to the folders' common parent."""
    folders = [Path(f).expanduser().resolve() for f in ([folders] if isinstance(folders, str | Path) else folders)]
    for folder in folders:
        if not folder.is_dir():
            raise ConfigError(f"{folder}: no such folder; pass a sweep folder such as outputs/train/multiruns/<sweep>")
    root = Path(os.path.commonpath(folders))
    runs = sorted({run.resolve() for folder in folders for run in find_runs(folder)})
    if not runs:
        raise DataError(
            f"{', '.join(map(str, folders))}: no training runs found (folders with {METRICS_FILE}); pass a folder "
            "written by python -m skinlesion.train, e.g. outputs/train/multiruns/<sweep>"
        )
    table = pd.DataFrame([run_row(run, root, prefer) for run in runs])
    # The "config" of a run: its overrides minus the model, the seed and what all runs share.
    common = set.intersection(*(set(o) for o in table["overrides"]))
    table["config"] = [
        " ".join(o for o in overrides if o not in common and not o.startswith("model="))
        for overrides in table["overrides"]
    ]
    first = ["run", "status", "backbone", "config", "seed"]
    return table[first + [c for c in table.columns if c not in (*first, "error")] + ["error"]]


def run_predictions(run_dir: str, split: str) -> pd.DataFrame | None:
    """A run's ``predictions_<split>.csv`` (ids as text), or None where it wrote none."""
    return read_predictions(Path(run_dir) / f"predictions_{split}.csv")
