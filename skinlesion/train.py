"""Train one backbone with the two-stage recipe and leave a complete run folder.

    python -m skinlesion.train model=densenet121
    python -m skinlesion.train -m model=resnet50,densenet121,mobilenetv2,efficientnet_b0,inception_v3

:func:`train` is the plain function (tests and sweepers call it); ``main`` is the thin Hydra wrapper.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from skinlesion import cli, tracking
from skinlesion.callbacks.early_stopping import Stage2EarlyStopping
from skinlesion.callbacks.ema import EMAWeights
from skinlesion.callbacks.finetune import TwoStageFinetuning
from skinlesion.callbacks.history import TrainingHistory
from skinlesion.clinical.thresholds import CalibrationSet, ClinicalTargets
from skinlesion.data.datamodule import SPLIT_FILE, SkinLesionDataModule
from skinlesion.data.layouts import load_records
from skinlesion.data.splits import check_same_split
from skinlesion.errors import CheckpointError, ConfigError
from skinlesion.gradcam.gallery import write_validation_gallery
from skinlesion.gradcam.maps import check_method
from skinlesion.inference.predictions import SplitPredictions
from skinlesion.models.backbone import count_parameters
from skinlesion.models.converted import describe_weights
from skinlesion.models.module import SkinLesionClassifier
from skinlesion.runfolder.checkpoints import check_backbone, read_checkpoint
from skinlesion.runfolder.config_tree import show_config_tree
from skinlesion.runfolder.files import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    best_checkpoint,
    write_resolved_config,
)
from skinlesion.runfolder.model_card import write_model_card
from skinlesion.runfolder.resume import check_resume, record_resume, replayed_overrides, resume_arguments
from skinlesion.runfolder.summary import COMPLETED, FAILED, FAILURE_FILE, TRAIN, RunSummary
from skinlesion.scoring.artifacts import split_interval_method, write_split_artifacts
from skinlesion.scoring.calibration import fit_temperature, write_calibration
from skinlesion.scoring.clinical import evaluate_splits
from skinlesion.settings import TrainSettings, check_settings

log = logging.getLogger(__name__)


def _instantiate_section(section: DictConfig | None, group: str) -> list[Any]:
    """Every ``_target_`` entry of a dict-of-configs section (callbacks, loggers); others are skipped.

    An entry whose optional package is missing (``logger=mlflow`` without mlflow) fails in one line.
    """
    objects = []
    for name, entry in (section or {}).items():
        if not (isinstance(entry, DictConfig) and "_target_" in entry):
            continue
        try:
            objects.append(instantiate(entry))
        except InstantiationException as err:
            if not isinstance(err.__cause__, ModuleNotFoundError):
                raise
            raise ConfigError(
                f"{group}.{name} ({entry._target_}) needs a package that is not installed ({err.__cause__}); "
                f"install it (pip install -e '.[loggers]' has the optional loggers) or choose another {group}"
            ) from err
    return objects


def _resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    if not cfg.ckpt_path:
        return None
    path = run_dir / CHECKPOINT_DIR / "last.ckpt" if cfg.ckpt_path == "last" else Path(cfg.ckpt_path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={cfg.ckpt_path}: no checkpoint at {path}")
    checkpoint = read_checkpoint(path)
    check_backbone(checkpoint, cfg.model.name, path)
    if "optimizer_states" not in checkpoint:
        raise CheckpointError(
            f"{path} holds weights only (best.ckpt is for evaluation and the tools); resume from "
            f"{path.parent / 'last.ckpt'}"
        )
    return str(path)


def _resume_overrides(run_dir: Path) -> list[str]:
    """This resume's own command-line overrides (after the replayed ones), to replay on a later resume."""
    if not HydraConfig.initialized():
        return []
    task = list(HydraConfig.get().overrides.task)
    replayed = replayed_overrides(run_dir)
    mine = task[len(replayed) :] if task[: len(replayed)] == replayed else task
    return [o for o in mine if not o.startswith("ckpt_path=")]


def _record_failure(run_dir: Path, cfg: DictConfig, err: BaseException) -> None:
    """Write the error where the report looks for it, without replacing a completed run's metrics."""
    completed = RunSummary.exists(run_dir) and RunSummary.read(run_dir).completed
    target = run_dir / (FAILURE_FILE if completed else METRICS_FILE)
    problem = cli.user_error(err)  # the ConfigError, not Hydra's InstantiationException around it
    cause, message = (problem, cli.one_line(problem)) if problem else (err, str(err))
    summary = RunSummary(
        task=TRAIN,
        status=FAILED,
        run_dir=str(run_dir),
        backbone=cfg.model.name,
        seed=cfg.seed,
        error=f"{type(cause).__name__}: {message}",
        traceback=traceback.format_exc(limit=20),
    )
    try:
        summary.write(target)
    except OSError as write_error:  # an unwritable run folder: the error itself is what the user must see
        log.warning("could not record the failure in %s: %s", target, write_error)


def _check_distributed_launch(trainer: L.Trainer) -> None:
    """Lightning starts DDP ranks by re-running the command line, which in a local multirun is the whole sweep."""
    if (
        trainer.world_size > 1
        and cli.is_multirun()
        and not trainer.strategy.cluster_environment.creates_processes_externally
    ):
        raise ConfigError(
            "trainer=ddp with several devices cannot run inside a local multirun (Lightning re-runs the command "
            "line for each rank, which would restart the whole sweep); train the backbones one command at a time, "
            "or sweep on a cluster with hydra/launcher=submitit_slurm, where SLURM starts the ranks"
        )


def train(cfg: DictConfig) -> RunSummary | None:
    """Fit, pick the best checkpoint, calibrate, test; return the summary written to ``metrics.json`` (None on
    DDP ranks other than 0, which write nothing)."""
    run_dir = Path(cfg.paths.output_dir)
    resumed_folder = (run_dir / CONFIG_FILE).is_file()  # ckpt_path=... continues a run in its own folder
    try:  # impossible values, a missing, corrupt or foreign checkpoint, or changed settings: before any work
        check_settings(cfg, TrainSettings)
        ckpt_path = _resume_path(cfg, run_dir)
        changes = check_resume(cfg, run_dir) if ckpt_path and resumed_folder else None
        if changes is not None and (run_dir / SPLIT_FILE).is_file():
            _check_resumed_split(cfg, run_dir / SPLIT_FILE)
    except Exception as err:
        if rank_zero_only.rank == 0 and not resumed_folder:  # a refused resume leaves that run's folder alone
            _record_failure(run_dir, cfg, err)
        raise
    try:
        return _train(cfg, run_dir, ckpt_path, changes)
    except Exception as err:
        if rank_zero_only.rank == 0:
            _record_failure(run_dir, cfg, err)
        raise


def _check_resumed_split(cfg: DictConfig, split_file: Path) -> None:
    """The data must still give the run's split (listing and splitting only: nothing decoded or cached)."""
    datamodule: SkinLesionDataModule = instantiate(cfg.data, cache={"enabled": False}, generate_synthetic=False)
    records = datamodule.read_records()
    records["split"] = datamodule.assign_split(records)
    check_same_split(records, split_file)


def _options(cfg: DictConfig) -> tuple[EMAWeights | None, Stage2EarlyStopping | None]:
    """The averaged weights and early stopping, each None when off (the default)."""
    ema = EMAWeights(cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None
    settings = cfg.early_stopping
    stopping = (
        Stage2EarlyStopping(cfg.monitor, cfg.monitor_mode, settings.patience, settings.min_delta)
        if settings.patience is not None
        else None
    )
    return ema, stopping


def _train(cfg: DictConfig, run_dir: Path, ckpt_path: str | None, resume_changes: dict | None) -> RunSummary | None:
    if rank_zero_only.rank == 0 and resume_changes is None:  # a resumed run keeps its config.yaml
        write_resolved_config(cfg, run_dir)
    if rank_zero_only.rank == 0 and cfg.print_config:
        show_config_tree(cfg, run_dir if resume_changes is None else None)
    if cfg.data.get("synthetic") is None:  # a missing dataset fails here, before any model is built
        load_records(cfg.data.root, cfg.data.layout, cfg.data.subset)
    if cfg.gallery.enabled:
        check_method(cfg.gallery.method, "gallery.method")  # now, not after hours of training
    L.seed_everything(cfg.seed, workers=True)
    module: SkinLesionClassifier = instantiate(cfg.module)
    datamodule: SkinLesionDataModule = instantiate(  # the image size the model resolved (timm's when null)
        cfg.data,
        image_size=module.preprocessing.image_size,
        preprocessing=module.preprocessing,
        metadata=module.hparams.metadata,  # the model's encoding: batches then carry "metadata"
        output_dir=str(run_dir),
        generate_synthetic=resume_changes is None,  # a resumed run needs the very set it was started on
    )
    finetune: TwoStageFinetuning = instantiate(cfg.finetune)
    ema, stopping = _options(cfg)
    callbacks = [*_instantiate_section(cfg.callbacks, "callbacks"), finetune, *filter(None, (ema, stopping))]
    loggers = _instantiate_section(cfg.logger, "logger")
    if not loggers:  # the learning-rate monitor has nowhere to write (Lightning refuses it without a logger)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    tracking.log_start(loggers, cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    finetune.resolve(module, trainer.max_epochs)  # before fit, where the image cache may take minutes to build
    _check_distributed_launch(trainer)

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if rank_zero_only.rank == 0 and resume_changes is not None:  # after the data was found unchanged
        record_resume(run_dir, str(ckpt_path), resume_changes, _resume_overrides(run_dir))
    fit_time = time.perf_counter() - start
    history = next((c for c in callbacks if isinstance(c, TrainingHistory)), None)
    last_epoch = dict(history.rows[-1]) if history and history.rows else {}
    if stopping is not None and stopping.describe()["stopped_epoch"] is not None:
        log.info("early stopping in epoch %d: %s", stopping.stopped_epoch, stopping.stopping_reason_message)

    # The best weights on val, the temperature fitted on those predictions, then test with it.
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    losses = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)[0]
    uncalibrated = {"val": module.take_predictions("val")}
    calibration = _calibrate(cfg, module, uncalibrated["val"])
    clinical_set = CalibrationSet.from_predictions(  # the clinical thresholds' validation set, into best.ckpt
        uncalibrated["val"], datamodule.records, calibration["temperature"], ClinicalTargets.from_config(cfg.clinical)
    )
    module.clinical_calibration = clinical_set.to_checkpoint()
    if datamodule.has_test:
        losses |= trainer.test(module, datamodule=datamodule, verbose=False)[0]
        uncalibrated["test"] = module.take_predictions("test")
    best_file = best_checkpoint(run_dir)
    trainer.save_checkpoint(best_file, weights_only=True)  # best weights + temperature
    if not trainer.is_global_zero:
        return None

    metrics = {k: v for k, v in losses.items() if k.endswith("/loss")}  # the training loss on the best weights
    intervals = {}  # what each split's bootstrap intervals resample: lesions, or images where none are named
    calibrated = {split: p.with_temperature(calibration["temperature"]) for split, p in uncalibrated.items()}
    for split, predictions in calibrated.items():
        metrics |= _split_artifacts(
            predictions, module.class_names, datamodule.records, run_dir, split, calibration["temperature"]
        )
        intervals[split] = split_interval_method(predictions.records_of(datamodule.records))
    clinical_metrics, clinical = evaluate_splits(
        run_dir, calibrated, datamodule.records, clinical_set, None, "val", cfg.clinical.figures
    )
    metrics |= clinical_metrics
    total, trainable = count_parameters(module.backbone)
    summary = RunSummary(
        task=TRAIN,
        status=COMPLETED,
        run_dir=str(run_dir),
        backbone=cfg.model.name,
        seed=cfg.seed,
        metrics=metrics,
        interval_method=intervals,
        timm_name=cfg.model.timm_name,
        pretrained=bool(cfg.model.pretrained or cfg.model.weights),
        weights=describe_weights(cfg.model.timm_name, cfg.model.weights, cfg.model.pretrained),
        image_size=module.preprocessing.image_size,
        monitor=cfg.monitor,
        best_epoch=_best_epoch(history, cfg.monitor, cfg.monitor_mode),
        best_score=float(checkpoint.best_model_score) if best and checkpoint.best_model_score is not None else None,
        best_checkpoint=str(best_file),
        epochs=trainer.current_epoch,
        params_total=total,
        params_trainable=trainable,
        finetune=finetune.describe(module),  # what each stage trained: the stage-2 share of the backbone
        train_time_s=round(history.train_time_s, 2) if history else None,
        fit_time_s=round(fit_time, 2),
        train_images_per_s=round(history.images_per_s, 1) if history else None,
        calibration=calibration,
        last_epoch=last_epoch,
        clinical=clinical,
        ema=ema.describe() if ema is not None else {},
        early_stopping=stopping.describe() if stopping is not None else {},
    )
    summary.write()
    write_model_card(run_dir)  # from the files just written, so it always describes them
    if cfg.gallery.enabled:  # after metrics.json: a figure problem never costs the run its results
        write_validation_gallery(
            module, datamodule, calibrated["val"], run_dir, cfg.gallery.per_class, cfg.gallery.method
        )
    tracking.log_end(loggers, summary, cfg.monitor, trainer.global_step, cfg.tracking.log_checkpoint)
    log.info("run folder: %s", run_dir)
    return summary


def _best_epoch(history: TrainingHistory | None, monitor: str, mode: str) -> int | None:
    """The first epoch with the best score, as ModelCheckpoint keeps it (a tie does not replace it)."""
    scores = [(row[monitor], row["epoch"]) for row in (history.rows if history else []) if monitor in row]
    if not scores:
        return None
    return (max if mode == "max" else min)(scores, key=lambda score: score[0])[1]


def _calibrate(cfg: DictConfig, module: SkinLesionClassifier, val: SplitPredictions) -> dict:
    """Fit the temperature on the validation predictions of the best weights; best.ckpt stores it."""
    temperature = fit_temperature(val.logits, val.labels) if cfg.calibrate else 1.0
    module.temperature.fill_(temperature)
    return {"temperature": temperature, "fitted_on": "val" if cfg.calibrate else None}


def _split_artifacts(
    calibrated: SplitPredictions,
    classes: tuple[str, ...],
    records: pd.DataFrame,
    run_dir: Path,
    split: str,
    temperature: float,
) -> dict:
    """The split's artifacts from its calibrated probabilities, and ECE/NLL before and after calibration (from
    the raw logits the predictions keep)."""
    metrics = write_split_artifacts(run_dir, split, calibrated, records, classes)
    return metrics | write_calibration(run_dir, split, calibrated, temperature)  # and reliability_<split>.png


def _score(metrics: dict, split: str, name: str, resampled: str = "lesion") -> str:
    text = f"{name} {metrics[f'{split}/{name}']:.3f}"
    low, high = metrics.get(f"{split}/{name}_ci_low"), metrics.get(f"{split}/{name}_ci_high")
    return text if low is None else f"{text} (95% {resampled}-bootstrap CI {low:.3f}-{high:.3f})"


def _print_summary(summary: RunSummary) -> None:
    """Where everything went, and the headline numbers, for the person at the terminal."""
    run = Path(summary.run_dir)
    metrics = summary.metrics
    split = "test" if "test/balanced_acc" in metrics else "val"
    headline = ", ".join(
        _score(metrics, split, name, summary.interval_method.get(split, {}).get("resampled", "lesion"))
        for name in ("balanced_acc", "acc", "auroc_macro")
        if f"{split}/{name}" in metrics
    )
    plots = ", ".join(sorted(p.name for p in run.glob("*.png")))
    stages = summary.finetune
    stage2 = (
        f"stage 2 ({stages['rule']}) {stages['stage2_trainable_params']:,} ({stages['stage2_backbone_share']:.1%} of "
        f"the backbone's {stages['backbone_params']:,}) from epoch {stages['unfreeze_at_epoch']}"
        if stages["stage2_trainable_params"] is not None
        else "no stage 2 (head only)"
    )
    print(
        f"\n{summary.backbone}: {split} {headline}\n"
        f"  weights      {summary.weights}\n"
        f"  trained      stage 1 (new head) {stages['stage1_trainable_params']:,} parameters; {stage2}\n"
        f"  run folder   {run}\n"
        f"  metrics      {run / METRICS_FILE}\n"
        f"  checkpoint   {summary.best_checkpoint}\n"
        f"  plots        {plots}"
    )


def _finish(summary: RunSummary, cfg: DictConfig) -> float:
    """The headline for the person at the terminal; the optimised metric for a sweeper."""
    if not cli.is_multirun():
        _print_summary(summary)
    return summary.metrics.get(cfg.optimized_metric, math.nan)


_launch = cli.hydra_command(train, "train", _finish)


def main() -> None:
    outputs = Path(os.environ.get("SKINLESION_HOME", ".")) / "outputs"
    sys.argv[1:] = resume_arguments(sys.argv[1:], outputs, Path.cwd())
    torch.set_float32_matmul_precision("high")
    _launch()


if __name__ == "__main__":
    main()
