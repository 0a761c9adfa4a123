"""Train one backbone with the two-stage recipe and leave a complete run folder.

    python -m skinlesion.train model=densenet121
    python -m skinlesion.train -m model=resnet50,densenet121,mobilenetv2,efficientnet_b0,inception_v3

:func:`train` is the plain function (tests and sweepers call it); ``main`` is the thin Hydra wrapper.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from skinlesion import cli
from skinlesion.artifacts import write_split_artifacts
from skinlesion.calibration import expected_calibration_error, fit_temperature, plot_reliability
from skinlesion.callbacks.history import TrainingHistory
from skinlesion.checkpoints import check_backbone, read_checkpoint
from skinlesion.data.datamodule import SkinLesionDataModule
from skinlesion.errors import ConfigError
from skinlesion.models.backbone import count_parameters
from skinlesion.models.module import SkinLesionClassifier
from skinlesion.runs import CHECKPOINT_DIR, METRICS_FILE, read_json, resume_run_dir, write_json, write_resolved_config

log = logging.getLogger(__name__)

BEST_CHECKPOINT = "best.ckpt"


def _instantiate_section(section: DictConfig | None) -> list[Any]:
    """Every ``_target_`` entry of a dict-of-configs section (callbacks, loggers); others are skipped."""
    return [instantiate(c) for c in (section or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def _resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    if not cfg.ckpt_path:
        return None
    path = run_dir / CHECKPOINT_DIR / "last.ckpt" if cfg.ckpt_path == "last" else Path(cfg.ckpt_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no checkpoint at {path}")
    check_backbone(read_checkpoint(path), cfg.model.name, path)
    return str(path)


def _record_failure(run_dir: Path, cfg: DictConfig, err: BaseException) -> None:
    """Write the error where the report looks for it, without replacing a completed run's metrics."""
    target = run_dir / METRICS_FILE
    if target.is_file() and read_json(target).get("status") == "completed":
        target = run_dir / "failure.json"
    write_json(
        target,
        {
            "status": "failed",
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(limit=20),
            "backbone": cfg.model.name,
            "seed": cfg.seed,
            "run_dir": str(run_dir),
        },
    )


def train(cfg: DictConfig) -> dict:
    """Fit, pick the best checkpoint, calibrate, test; return the summary written to ``metrics.json``."""
    run_dir = Path(cfg.paths.output_dir)
    try:
        return _train(cfg, run_dir)
    except Exception as err:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            _record_failure(run_dir, cfg, err)
        raise


def _train(cfg: DictConfig, run_dir: Path) -> dict:
    write_resolved_config(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True)
    module: SkinLesionClassifier = instantiate(cfg.module)
    datamodule: SkinLesionDataModule = instantiate(
        cfg.data, preprocessing=module.preprocessing, output_dir=str(run_dir)
    )
    callbacks = [*_instantiate_section(cfg.callbacks), instantiate(cfg.finetune)]
    loggers = _instantiate_section(cfg.logger)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    ckpt_path = _resume_path(cfg, run_dir)

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_time = time.perf_counter() - start
    history = next((c for c in callbacks if isinstance(c, TrainingHistory)), None)
    last_epoch = dict(history.rows[-1]) if history and history.rows else {}

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)
    metrics, calibration = _calibrate(cfg, module, run_dir, trainer.is_global_zero)
    if datamodule.has_test:
        trainer.test(module, datamodule=datamodule, verbose=False)
    best_checkpoint = run_dir / CHECKPOINT_DIR / BEST_CHECKPOINT
    trainer.save_checkpoint(best_checkpoint, weights_only=True)  # best weights + temperature
    if not trainer.is_global_zero:
        return {}

    for split in ("val", "test"):
        metrics |= _split_artifacts(module, datamodule, run_dir, split)
    total, trainable = count_parameters(module.backbone)
    summary = {
        "status": "completed",
        "run_dir": str(run_dir),
        "backbone": cfg.model.name,
        "timm_name": cfg.model.timm_name,
        "pretrained": bool(cfg.model.pretrained or cfg.model.weights),
        "image_size": module.preprocessing.image_size,
        "seed": cfg.seed,
        "monitor": cfg.monitor,
        "best_epoch": _best_epoch(history, cfg.monitor, cfg.monitor_mode),
        "best_score": float(checkpoint.best_model_score) if best and checkpoint.best_model_score is not None else None,
        "best_checkpoint": str(best_checkpoint),
        "epochs": trainer.current_epoch,
        "params_total": total,
        "params_trainable": trainable,
        "train_time_s": round(history.train_time_s, 2) if history else None,
        "fit_time_s": round(fit_time, 2),
        "train_images_per_s": round(history.images_per_s, 1) if history else None,
        "calibration": calibration,
        "metrics": metrics,
        "last_epoch": last_epoch,
    }
    write_json(run_dir / METRICS_FILE, summary)
    if cfg.gallery.enabled:
        from skinlesion.explain import write_validation_gallery

        write_validation_gallery(module, datamodule, run_dir, cfg.gallery.per_class, cfg.gallery.method)
    log.info("run folder: %s", run_dir)
    return summary


def _best_epoch(history: TrainingHistory | None, monitor: str, mode: str) -> int | None:
    scores = [(row[monitor], row["epoch"]) for row in (history.rows if history else []) if monitor in row]
    if not scores:
        return None
    return (max if mode == "max" else min)(scores)[1]


def _calibrate(cfg: DictConfig, module: SkinLesionClassifier, run_dir: Path, write: bool) -> tuple[dict, dict]:
    """Fit the temperature on the validation outputs of the best weights; ECE before and after."""
    val = module.outputs["val"]
    temperature = fit_temperature(val["logits"], val["labels"]) if cfg.calibrate else 1.0
    module.temperature.fill_(temperature)
    before = val["logits"].softmax(1)
    after = (val["logits"] / temperature).softmax(1)
    metrics = {
        "val/ece_uncalibrated": expected_calibration_error(before, val["labels"]),
        "val/ece": expected_calibration_error(after, val["labels"]),
    }
    if write:
        curves = {"uncalibrated": (before, val["labels"]), f"T={temperature:.2f}": (after, val["labels"])}
        plot_reliability(curves, run_dir / "reliability_val.png", title="validation")
    return metrics, {"temperature": temperature, "fitted_on": "val" if cfg.calibrate else None}


def _split_artifacts(module: SkinLesionClassifier, datamodule: SkinLesionDataModule, run_dir: Path, split: str) -> dict:
    out = module.outputs.get(split)
    if out is None:
        return {}
    records = datamodule.records.loc[out["indices"].numpy()]
    probs = (out["logits"] / float(module.temperature)).softmax(1)
    metrics = write_split_artifacts(run_dir, split, probs, out["labels"], records["image_id"], module.class_names)
    if split == "test":
        metrics["test/ece_uncalibrated"] = expected_calibration_error(out["logits"].softmax(1), out["labels"])
        metrics["test/ece"] = expected_calibration_error(probs, out["labels"])
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    summary = cli.run_task(train, cfg)
    if not isinstance(summary, dict) or not summary:
        return float("nan") if not isinstance(summary, float) else summary
    return summary["metrics"].get(cfg.optimized_metric, float("nan"))


def main() -> None:
    outputs = Path(os.environ.get("SKINLESION_HOME", ".")) / "outputs"
    sys.argv += resume_run_dir(sys.argv[1:], outputs)
    torch.set_float32_matmul_precision("high")
    cli.launch(_hydra_main)


if __name__ == "__main__":
    main()
