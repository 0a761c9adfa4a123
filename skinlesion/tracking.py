"""What the experiment loggers (CSV, TensorBoard, MLflow, W&B) receive beyond Lightning's per-step curves.

A run has to be findable and comparable by its recipe in any tracking UI, so at the start every logger
gets the whole resolved config flattened to ``section.key`` hyper-parameters (the names a Hydra override
uses, seed, trainer and the chosen config groups included), and at the end the run's final numbers from
its :class:`~skinlesion.runfolder.summary.RunSummary` (``final/<split>/<metric>``, intervals included),
TensorBoard's ``hp_metric`` (the monitored metric, which links the hyper-parameters to a result), the
run folder's figures as images where the logger shows images, and, for MLflow, the run folder's files
as artifacts. Lightning's own logging of the module's init arguments is switched off
(``save_hyperparameters(logger=False)``): they are a subset of the config, under other names.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from skinlesion.runfolder.files import CHECKPOINT_DIR, best_checkpoint
from skinlesion.runfolder.summary import RunSummary

log = logging.getLogger(__name__)
FINAL = "final"  # prefix of the end-of-run metrics: the per-epoch val/* curves keep their own names
HP_METRIC = "hp_metric"  # the scalar TensorBoard's HParams tab shows beside each run's hyper-parameters
# Figures worth a look in a logger's image tab; every file of the run folder goes to MLflow as an artifact.
IMAGE_PATTERNS = ("confusion_matrix_*.png", "training_curves.png", "reliability_*.png", "gradcam/gallery_*.png")
ARTIFACT_PATTERNS = ("*.png", "*.json", "*.yaml", "*.csv", "*.txt", "*.md", "gradcam/*.png", ".hydra/*.yaml")


def flat_config(cfg: Mapping[str, Any] | DictConfig, prefix: str = "") -> dict[str, Any]:
    """The resolved config as ``{"optimizer.lr": 0.001, ...}``; lists stay whole values (a logger shows them
    as text)."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flat_config(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def config_choices() -> dict[str, str]:
    """The config group chosen for each group (``choice.experiment``, ``choice.model``, ...) in a Hydra job."""
    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {f"choice.{group}": str(name) for group, name in choices.items() if not group.startswith("hydra/")}


def run_hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    """Everything that defines the run: the flattened config and the chosen config groups."""
    return flat_config(cfg) | config_choices()


def log_start(loggers: Iterable[Logger], cfg: DictConfig) -> None:
    """The run's hyper-parameters, before training (a crashed run is still findable by its recipe)."""
    params = run_hyperparameters(cfg)
    for logger in loggers:
        logger.log_hyperparams(params)


def final_metrics(summary: RunSummary) -> dict[str, float]:
    """The summary's finite metrics under ``final/``, with the best epoch and the time it took."""
    values = {f"{FINAL}/{k}": v for k, v in summary.metrics.items()}
    extra = {"best_epoch": summary.best_epoch, "fit_time_s": summary.fit_time_s, "stage2_share": summary.stage2_share}
    values |= {f"{FINAL}/{k}": v for k, v in extra.items() if v is not None}
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and math.isfinite(v)}


def log_end(loggers: Iterable[Logger], summary: RunSummary, monitor: str, step: int, checkpoint: bool) -> None:
    """The final metrics to every logger, then what each kind of logger can show of the run folder."""
    run_dir = Path(summary.run_dir)
    metrics = final_metrics(summary)
    monitored = summary.metrics.get(monitor, summary.best_score)
    images = sorted(p for pattern in IMAGE_PATTERNS for p in run_dir.glob(pattern))
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, TensorBoardLogger):
            if monitored is not None:
                logger.log_metrics({HP_METRIC: float(monitored)}, step=step)
            for image in images:
                logger.experiment.add_image(_image_tag(image, run_dir), _read_rgb(image), step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            for image in images:
                logger.log_image(_image_tag(image, run_dir), [str(image)])
        elif isinstance(logger, MLFlowLogger):
            _log_artifacts(logger, run_dir, checkpoint)
        logger.finalize("success")
        if isinstance(logger, WandbLogger):  # the next run of a sweep in this process needs a run of its own
            logger.experiment.finish()


def _image_tag(image: Path, run_dir: Path) -> str:
    return image.relative_to(run_dir).with_suffix("").as_posix()


def _read_rgb(image: Path) -> np.ndarray:
    with Image.open(image) as picture:
        return np.asarray(picture.convert("RGB"))


def _log_artifacts(logger: MLFlowLogger, run_dir: Path, checkpoint: bool) -> None:
    """The run folder's figures, metrics.json, config.yaml and reports (checkpoints only when asked: large)."""
    files = sorted({p for pattern in ARTIFACT_PATTERNS for p in run_dir.glob(pattern) if p.is_file()})
    for path in files:
        folder = path.parent.relative_to(run_dir).as_posix()
        logger.experiment.log_artifact(logger.run_id, str(path), None if folder == "." else folder)
    best = best_checkpoint(run_dir)
    if checkpoint and best.is_file():
        logger.experiment.log_artifact(logger.run_id, str(best), CHECKPOINT_DIR)
    log.info("MLflow run %s: %d artifact(s) logged", logger.run_id, len(files) + (checkpoint and best.is_file()))
