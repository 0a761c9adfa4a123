"""``metrics.json``: one type for what a run reports about itself, written and read in one place.

``train`` and ``evaluate`` write it, the sweep report, ensembles and the resume check read it, and the
tests build their fake runs with it, so a key is named once: what training calls
``train_images_per_s`` is what the report reads. ``status`` is ``completed`` or ``failed`` (with the
error), which is how the report tells failed jobs from finished ones. Files written before ``task``
was recorded are training runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from skinlesion.runfolder.files import METRICS_FILE, read_json, write_json

COMPLETED, FAILED = "completed", "failed"
FAILURE_FILE = "failure.json"  # a failure after the run had completed (a resume) must not replace its metrics
TRAIN, EVALUATE = "train", "evaluate"
# Fields that belong to one task only; the others are written for every run.
TRAIN_FIELDS = (
    "timm_name", "pretrained", "weights", "image_size", "monitor", "best_epoch", "best_score", "best_checkpoint",
    "epochs", "params_total", "params_trainable", "finetune", "train_time_s", "fit_time_s", "train_images_per_s",
    "calibration", "last_epoch", "ema", "early_stopping",
)  # fmt: skip
EVALUATE_FIELDS = (
    "split", "dataset", "images", "split_check", "tta_views", "tta", "calibrated", "ensemble", "ensemble_selection",
    "members",
)  # fmt: skip
FAILURE_FIELDS = ("error", "traceback")


@dataclass
class RunSummary:
    """A run's ``metrics.json``: metrics are ``split/metric`` keys, with ``_ci_low``/``_ci_high`` intervals."""

    task: str
    status: str
    run_dir: str
    backbone: str | None = None
    seed: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    interval_method: dict[str, dict[str, str]] = field(default_factory=dict)  # per split: lesion or image, why
    # the clinical evaluation (skinlesion.scoring.clinical): its targets, the thresholds fitted on validation,
    # and per split the files written, the notes and the flagged subgroups
    clinical: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None
    # training
    timm_name: str | None = None
    pretrained: bool | None = None
    weights: str | None = None  # what the backbone started from
    image_size: int | None = None
    monitor: str | None = None
    best_epoch: int | None = None
    best_score: float | None = None
    best_checkpoint: str | None = None
    epochs: int | None = None
    params_total: int | None = None
    params_trainable: int | None = None
    finetune: dict[str, Any] = field(default_factory=dict)  # what each stage trained (the stage-2 share)
    train_time_s: float | None = None
    fit_time_s: float | None = None
    train_images_per_s: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    last_epoch: dict[str, Any] = field(default_factory=dict)
    ema: dict[str, Any] = field(default_factory=dict)  # {} or the averaged weights that were evaluated
    early_stopping: dict[str, Any] = field(default_factory=dict)  # {} or its settings and the epoch it stopped in
    # evaluation
    split: str | None = None
    dataset: dict[str, Any] = field(default_factory=dict)
    images: int | None = None
    split_check: dict[str, Any] = field(default_factory=dict)  # how the images were matched to split.csv files
    tta_views: int | None = None  # how many views each probability averages (1: none)
    tta: dict[str, Any] = field(default_factory=dict)  # which views: flips, crops, scales
    calibrated: bool | None = None
    ensemble: bool | None = None
    # how the members were combined (mean, greedy, stacking), on which split, with which weights
    ensemble_selection: dict[str, Any] = field(default_factory=dict)
    members: dict[str, Any] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED

    @property
    def stage2_share(self) -> float | None:
        """The share of the backbone's parameters stage 2 trained (None: head only, or an older run)."""
        return self.finetune.get("stage2_backbone_share")

    def to_dict(self) -> dict[str, Any]:
        """The file's content: the common fields, the task's own, and the error only for a failed run."""
        own = TRAIN_FIELDS if self.task == TRAIN else EVALUATE_FIELDS
        skipped = set(EVALUATE_FIELDS if self.task == TRAIN else TRAIN_FIELDS)
        if self.status != FAILED:
            skipped |= set(FAILURE_FIELDS)
        else:  # a failed run has no results to report
            skipped |= {f for f in own if getattr(self, f) in (None, {}, [])} | {
                "metrics",
                "interval_method",
                "clinical",
            }
        return {k: v for k, v in asdict(self).items() if k not in skipped}

    def write(self, path: str | Path | None = None) -> Path:
        """Atomically, as ``<run_dir>/metrics.json``, or as ``path`` (a failure after a run had completed goes
        beside its metrics, in :data:`FAILURE_FILE`)."""
        path = Path(path) if path else Path(self.run_dir) / METRICS_FILE
        write_json(path, self.to_dict())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known and v is not None}
        return cls(**{"task": TRAIN, "status": "unknown", "run_dir": "", **values})

    @classmethod
    def read(cls, run_dir: str | Path) -> RunSummary:
        """The ``metrics.json`` of ``run_dir`` (a file path is accepted too)."""
        path = Path(run_dir)
        return cls.from_dict(read_json(path if path.suffix == ".json" else path / METRICS_FILE))

    @classmethod
    def exists(cls, run_dir: str | Path) -> bool:
        return (Path(run_dir) / METRICS_FILE).is_file()
