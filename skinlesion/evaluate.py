"""Evaluate a checkpoint, or an ensemble of checkpoints, on a split or on an external labelled set.

    python -m skinlesion.evaluate ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt [split=val]
    python -m skinlesion.evaluate ckpt_path=... data=isic2018 data.subset=Test tta=true
    python -m skinlesion.evaluate ensemble=outputs/train/multiruns/<sweep> [ensemble_method=greedy|stacking]

The data settings are read from the checkpoint (every checkpoint carries its DataModule's), so ``val`` and
``test`` are exactly the run's own splits and the test metrics logged at the end of training are
reproduced. Each model sees the images through its own preprocessing (input size, interpolation,
normalisation), so an ensemble may mix backbones of different input sizes; members' probabilities are
aligned by record before they are averaged (``ensemble_method=mean``), or combined as greedy selection or
stacking chose on the validation split (:mod:`skinlesion.inference.selection`). :func:`evaluate` is the
plain function; ``main`` is the thin Hydra wrapper.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from skinlesion import cli
from skinlesion.config import to_plain
from skinlesion.errors import CheckpointError, ConfigError
from skinlesion.inference.ensemble import ENSEMBLE, ensemble_checkpoints, member_names
from skinlesion.inference.model import InferenceModel, resolve_device
from skinlesion.inference.predictions import SplitPredictions
from skinlesion.inference.selection import MEAN, STACKING, Stacker, greedy_selection, plain_mean
from skinlesion.inference.split import SCORED_SPLITS, predict_members
from skinlesion.inference.tta import ViewPlan, view_plan
from skinlesion.models.metrics import HEADLINE_METRICS
from skinlesion.plots import plot_roc_grid
from skinlesion.runfolder.files import write_resolved_config
from skinlesion.runfolder.summary import COMPLETED, EVALUATE, RunSummary
from skinlesion.scoring.artifacts import split_interval_method, write_split_artifacts
from skinlesion.scoring.bootstrap import Resamples, paired_difference
from skinlesion.scoring.calibration import expected_calibration_error, plot_reliability
from skinlesion.scoring.clinical import evaluate_splits
from skinlesion.settings import EvaluateSettings, check_settings

log = logging.getLogger(__name__)

MEMBERS_DIR = "members"


# ---- settings ----------------------------------------------------------------------------------------
def _set_values(node: Any) -> Any:
    """The explicitly set (non-null) entries of a config node, recursively; empty dicts dropped."""
    if isinstance(node, dict):
        kept = {k: _set_values(v) for k, v in node.items() if v is not None}
        return {k: v for k, v in kept.items() if v != {}}
    return node


# What data=<dataset> contributes besides the images: how they are read and loaded.
LOADER_SETTINGS = (
    "cache",
    "batch_size",
    "eval_batch_size",
    "num_workers",
    "pin_memory",
    "on_bad_image",
    "max_image_pixels",
)
# What decides a run's val/test images: members that differ here were not scored on the same split.
SPLIT_SETTINGS = ("layout", "subset", "split", "test_set")


def data_settings(cfg: DictConfig, trained_with: dict) -> dict:
    """The checkpoint's DataModule settings with ``data.*`` overrides.

    ``data=<dataset>`` makes that dataset's own ``test_set`` (e.g. ``data=ham10000_isic2018_test``), or
    else all of it, the test split, read with that config's loader settings.
    """
    data = to_plain(cfg.data)
    settings = dict(trained_with)
    if "_target_" not in data:
        return to_plain(OmegaConf.merge(settings, _set_values(data)))
    chosen = data.get("test_set") or {k: data[k] for k in ("root", "layout", "subset")}
    if (chosen.get("subset") or "Test") == "Training":
        log.warning(
            "evaluating on the Training subset of %s: if the model was trained on HAM10000, these are its own "
            "training images (ISIC 2018's training set is HAM10000); use data.subset=Test",
            chosen["root"],
        )
    return settings | {k: data[k] for k in LOADER_SETTINGS if k in data} | {"test_set": chosen}


def _check_settings(cfg: DictConfig) -> ViewPlan:
    if cfg.split not in SCORED_SPLITS:
        raise ConfigError(f"split={cfg.split} is not valid; choose one of {', '.join(SCORED_SPLITS)}")
    views = view_plan(cfg.tta, cfg.tta_views, cfg.tta_crops, cfg.tta_scales)
    if "_target_" in cfg.data and cfg.split != "test":
        raise ConfigError(f"data=<dataset> is evaluated as the test split; drop split={cfg.split}")
    if cfg.split_from == "file" and ("_target_" in cfg.data or (cfg.split == "test" and cfg.data.test_set.root)):
        raise ConfigError("split_from=file applies to a run's own val/test split, not to an external set; drop it")
    if cfg.ckpt_path and cfg.ensemble:
        raise ConfigError("pass either ckpt_path=... or ensemble=..., not both")
    if not cfg.ckpt_path and not cfg.ensemble:
        raise ConfigError(
            "nothing to evaluate: pass ckpt_path=<run>/checkpoints/best.ckpt, or ensemble=[ckpt,...] or "
            "ensemble=<multirun folder>"
        )
    if cfg.ensemble_method != MEAN and not cfg.ensemble:
        raise ConfigError(f"ensemble_method={cfg.ensemble_method} combines the members of ensemble=[...]; drop it")
    return views


def load_members(cfg: DictConfig) -> dict[str, InferenceModel]:
    """The checkpoint, or the ensemble's members, by name (in order)."""
    paths = [Path(cfg.ckpt_path).expanduser()] if cfg.ckpt_path else ensemble_checkpoints(to_plain(cfg.ensemble))
    members = {}
    for name, path in zip(member_names(paths), paths, strict=True):
        members[name] = InferenceModel.load(path, cfg.device)
        if not members[name].data:
            raise CheckpointError(f"{path}: has no data settings; it was not written by skinlesion.train")
    classes = {m.classes for m in members.values()}
    if len(classes) > 1:
        raise ConfigError(f"ensemble members predict different classes: {sorted(classes)}")
    return members


def _check_same_split(members: dict[str, InferenceModel], settings: dict, split: str) -> None:
    """Members trained on different splits would be scored on images other members trained on."""
    if split == "test" and settings.get("test_set"):  # an external set: no member trained on it
        return
    splits = {name: {k: m.data.get(k) for k in SPLIT_SETTINGS} for name, m in members.items()}
    if len({repr(s) for s in splits.values()}) > 1:
        detail = "; ".join(f"{name}: {split}" for name, split in splits.items())
        raise ConfigError(
            f"the ensemble members were trained on different splits ({detail}): their val/test images include "
            "images other members trained on. Evaluate them on an external set (data.test_set.root=...) instead"
        )


# ---- combining an ensemble ---------------------------------------------------------------------------
OPTIMISTIC = (
    "split=val with a selection method: the members were combined on these very validation images, so the "
    "ensemble's val scores are optimistic; score split=test (or an external set) for an honest estimate"
)


def validation_settings(cfg: DictConfig, trained_with: dict) -> dict:
    """The run's own data, for the validation split an ensemble is combined on: ``data=<dataset>`` and
    ``data.test_set`` name only the scored test set."""
    if "_target_" in cfg.data:
        return dict(trained_with)
    return data_settings(cfg, trained_with) | {"test_set": trained_with.get("test_set")}


def _combine(
    cfg: DictConfig,
    members: dict[str, InferenceModel],
    device: torch.device,
    views: ViewPlan,
    results: dict[str, SplitPredictions],
    records: pd.DataFrame,
) -> tuple[SplitPredictions, dict]:
    """The ensemble's predictions of the scored split, and how they were combined (for ``metrics.json``).
    Greedy selection and stacking see the validation predictions only, never the scored split's labels."""
    if cfg.ensemble_method == MEAN:
        rule = plain_mean(list(results))
        return rule.combine(results), rule.to_dict()
    if cfg.split == "val":
        val, val_records = results, records
        log.warning(OPTIMISTIC)
    else:  # the same views and calibration as the scored split, so the weights fit what they are applied to
        settings = validation_settings(cfg, next(iter(members.values())).data)
        _check_same_split(members, settings, "val")
        val, val_records, _ = predict_members(members, settings, "val", device, views, cfg.calibrated, cfg.split_from)
    selection = cfg.ensemble_selection
    if cfg.ensemble_method == STACKING:
        rows = next(iter(val.values())).records_of(val_records)
        grouped = bool(rows["lesion_known"].all()) if "lesion_known" in rows else True
        rule = Stacker.fit(val, list(rows["lesion_id"]), selection.folds, grouped)
    else:
        rule = greedy_selection(val, selection.rounds, selection.metric)
    record = rule.to_dict() | {"selected_on": "val", "selection_images": len(next(iter(val.values())))}
    if cfg.split == "val":
        record["note"] = OPTIMISTIC
    shown = {k: v for k, v in record.items() if k != "path"}
    log.info("ensemble_method=%s, chosen on the validation split: %s", cfg.ensemble_method, shown)
    return rule.combine(results), record


# ---- the entry point ---------------------------------------------------------------------------------
def _write(out_dir: Path, split: str, name: str, result: SplitPredictions, records: pd.DataFrame, classes) -> dict:
    metrics = write_split_artifacts(out_dir, split, result, records, classes)
    metrics[f"{split}/ece"] = expected_calibration_error(result.probs, result.labels)
    plot_reliability({name: (result.probs, result.labels)}, out_dir / f"reliability_{split}.png", title=split)
    return metrics


def _ensemble_gains(results: dict[str, SplitPredictions], records: pd.DataFrame) -> pd.DataFrame:
    """Balanced accuracy of the ensemble minus each member's on the same images, lesion-bootstrapped in pairs."""
    ensemble = results[ENSEMBLE]
    resamples = Resamples.draw(ensemble.records_of(records)["lesion_id"])
    rows = []
    for name, member in results.items():
        if name != ENSEMBLE:
            gain = paired_difference(
                ensemble.labels.numpy(), ensemble.preds, member.preds, resamples, member.probs.shape[1]
            )
            rows.append({"model": name, **{f"ensemble_gain_{k}": v for k, v in gain.items()}})
    return pd.DataFrame(rows)


def _write_scores(
    out_dir: Path,
    split: str,
    results: dict[str, SplitPredictions],
    records: pd.DataFrame,
    classes: tuple[str, ...],
    intervals: dict[str, str],
) -> dict[str, dict]:
    """Artifacts of every model (an ensemble's members under members/<name>/), ROC curves and one table."""
    scores = {}
    for name, result in results.items():
        target = out_dir if name == ENSEMBLE or len(results) == 1 else out_dir / MEMBERS_DIR / name
        scores[name] = _write(target, split, name, result, records, classes)
    curves = {name: (r.labels.numpy(), r.probs.numpy()) for name, r in results.items()}
    plot_roc_grid(curves, classes, out_dir / f"roc_{split}.png")
    columns = (*HEADLINE_METRICS, "balanced_acc_ci_low", "balanced_acc_ci_high", "nll", "ece")
    table = pd.DataFrame([{"model": name, **{m: s.get(f"{split}/{m}") for m in columns}} for name, s in scores.items()])
    table["ci_resampled"] = intervals["resampled"]  # every model scored the same records
    if ENSEMBLE in results:
        table = table.merge(_ensemble_gains(results, records), on="model", how="left")
    table.to_csv(out_dir / f"models_{split}.csv", index=False)
    log.info("\n%s", table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    log.info("%s intervals resample %ss: %s", split, intervals["resampled"], intervals["reason"])
    return scores


def _clinical(
    cfg: DictConfig,
    out_dir: Path,
    members: dict[str, InferenceModel],
    headline: SplitPredictions,
    records: pd.DataFrame,
    external: bool,
    views: ViewPlan,
) -> tuple[dict, dict]:
    """The clinical evaluation of the scored split, with thresholds refitted on the validation predictions
    the checkpoint stores, for ``clinical.*`` (null: as trained); why not, where they cannot apply."""
    calibration = next(iter(members.values())).clinical
    reason = None
    if len(members) > 1:
        reason = "an ensemble has no validation predictions of its own to fit thresholds on"
    elif calibration is None:
        reason = "the checkpoint stores no validation predictions (trained before they were stored)"
    elif not cfg.calibrated:
        reason = "calibrated=false, but the thresholds are fitted on temperature-scaled probabilities"
    if reason is not None:
        calibration = None
    targets = calibration.settings.overridden(cfg.clinical) if calibration is not None else None
    fitted = "val" if cfg.split == "val" and not external else None
    metrics, clinical = evaluate_splits(
        out_dir, {cfg.split: headline}, records, calibration, targets, fitted, cfg.clinical.figures
    )
    notes = clinical["splits"][cfg.split]["notes"]
    if reason is not None:
        log.warning("no operating points, conformal sets or abstention on %s: %s", cfg.split, reason)
        notes.insert(0, reason)
    elif views.count > 1:
        notes.insert(0, "tta: the thresholds were fitted on single-view validation probabilities")
    if reason is None:
        notes.append("no out-of-distribution share: evaluate keeps probabilities, not logits (training reports it)")
    return metrics, clinical


def evaluate(cfg: DictConfig) -> RunSummary:
    """Predict, score and write the artifacts; return the summary written to ``metrics.json``."""
    check_settings(cfg, EvaluateSettings)
    views = _check_settings(cfg)
    members = load_members(cfg)
    if len(members) == 1 and cfg.ensemble_method != MEAN:  # before anything is written
        raise ConfigError(f"ensemble_method={cfg.ensemble_method} needs two or more members; {cfg.ensemble} has one")
    out_dir = Path(cfg.paths.output_dir)
    write_resolved_config(cfg, out_dir)
    first = next(iter(members.values()))
    settings = data_settings(cfg, first.data)
    split = cfg.split
    _check_same_split(members, settings, split)
    device = resolve_device(cfg.device)
    results, records, split_check = predict_members(
        members, settings, split, device, views, cfg.calibrated, cfg.split_from
    )
    selection = {}
    if len(members) > 1:  # every member scored the same records, in the same order
        combined, selection = _combine(cfg, members, device, views, results, records)
        results = {ENSEMBLE: combined, **results}
    headline = next(iter(results.values()))  # the ensemble's, or the single model's
    intervals = split_interval_method(headline.records_of(records))
    scores = _write_scores(out_dir, split, results, records, first.classes, intervals)
    external = settings.get("test_set") if split == "test" else None
    clinical_metrics, clinical = _clinical(cfg, out_dir, members, headline, records, bool(external), views)
    summary = RunSummary(
        task=EVALUATE,
        status=COMPLETED,
        run_dir=str(out_dir),
        backbone=first.model.spec.name if len(members) == 1 else ENSEMBLE,
        metrics=scores[next(iter(results))] | clinical_metrics,
        interval_method={split: intervals},  # lesions, or images where the set names no lesions
        split=split,
        dataset=external or {k: settings.get(k) for k in ("root", "layout", "subset", "split")},
        images=len(headline),
        split_check=split_check,  # how the images were matched to the runs' split.csv
        tta_views=views.count,
        tta=views.to_dict(),  # flips/rotations x (crops per scale above 1, or the image at scale 1)
        calibrated=bool(cfg.calibrated),
        ensemble=len(members) > 1,
        ensemble_selection=selection,
        members={
            name: {
                "checkpoint": str(m.path),
                "backbone": m.model.spec.name,
                "image_size": m.model.preprocessing.image_size,
                "temperature": float(m.model.temperature),
                "metrics": scores[name],
            }
            for name, m in members.items()
        },
        clinical=clinical,
    )
    summary.write()
    log.info("evaluation folder: %s", out_dir)
    return summary


def _score(summary: RunSummary, cfg: DictConfig) -> float:
    return summary.metrics.get(f"{cfg.split}/balanced_acc", math.nan)


main = cli.hydra_command(evaluate, "evaluate", _score)

if __name__ == "__main__":
    main()
