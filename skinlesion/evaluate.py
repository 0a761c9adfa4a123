"""Evaluate a checkpoint, or an ensemble of checkpoints, on a split or on an external labelled set.

    python -m skinlesion.evaluate ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt [split=val]
    python -m skinlesion.evaluate ckpt_path=... data=isic2018 data.subset=Test tta=true
    python -m skinlesion.evaluate ensemble=outputs/train/multiruns/<sweep>

The data settings are read from the checkpoint (every checkpoint carries its DataModule's), so ``val`` and
``test`` are exactly the run's own splits and the test metrics logged at the end of training are
reproduced. Each model sees the images through its own preprocessing (input size, interpolation,
normalisation), so an ensemble may mix backbones of different input sizes; members' probabilities are
aligned by record before they are averaged. :func:`evaluate` is the plain function; ``main`` is the thin
Hydra wrapper.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from skinlesion import cli
from skinlesion.artifacts import split_interval_method, write_split_artifacts
from skinlesion.bootstrap import Resamples, paired_difference
from skinlesion.calibration import expected_calibration_error, plot_reliability
from skinlesion.config import CONFIG_PACKAGE, to_plain
from skinlesion.data.datamodule import SPLIT_FILE, SkinLesionDataModule
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.data.splits import check_disjoint, check_same_split, read_run_split
from skinlesion.ensemble import ENSEMBLE, ensemble_checkpoints, member_names
from skinlesion.errors import CheckpointError, ConfigError, DataError
from skinlesion.inference import InferenceModel, resolve_device
from skinlesion.models.metrics import HEADLINE_METRICS
from skinlesion.models.module import SkinLesionClassifier
from skinlesion.plots import plot_roc_grid
from skinlesion.runs import CHECKPOINT_DIR, METRICS_FILE, write_json, write_resolved_config
from skinlesion.settings import EvaluateSettings, check_settings
from skinlesion.tta import predict_proba_tta, tta_views

log = logging.getLogger(__name__)

SPLITS = ("val", "test")
MEMBERS_DIR = "members"


@dataclass
class Predictions:
    probs: torch.Tensor  # N x classes, rows in record order
    labels: torch.Tensor
    indices: torch.Tensor  # rows of the DataModule's records


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


def _check_settings(cfg: DictConfig) -> int:
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split} is not valid; choose one of {', '.join(SPLITS)}")
    views = tta_views(cfg.tta, cfg.tta_views)
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


# ---- predicting --------------------------------------------------------------------------------------
def datamodule_for(
    settings: dict, preprocessing: Preprocessing, split: str, split_file: Path | None = None
) -> SkinLesionDataModule:
    """The data of ``split`` as the model sees it; ``split_file``: that run's recorded split, not a rebuilt one.
    A synthetic set is never generated here: a moved one must not be replaced by a new set."""
    settings = {**settings, "image_size": preprocessing.image_size}  # the model decides, not the training data config
    # An external test set is read on its own: evaluating a downloaded checkpoint on the ISIC 2018 test
    # set must not need the data it was trained on (nor spend minutes checking and caching it).
    external = split == "test" and bool(settings.get("test_set"))
    datamodule = SkinLesionDataModule(
        **settings,
        preprocessing=preprocessing,
        test_set_only=external,
        generate_synthetic=False,
        split_file=str(split_file) if split_file else None,
    )
    datamodule.setup("test")
    if split not in datamodule.datasets:
        hint = "data.split.test was 0 in training; use split=val or an external set (data.test_set.root=...)"
        raise ConfigError(f"there is no '{split}' split in this data{'; ' + hint if split == 'test' else ''}")
    return datamodule


@torch.no_grad()
def predict(
    model: SkinLesionClassifier,
    datamodule: SkinLesionDataModule,
    split: str,
    device: torch.device,
    views: int,
    calibrated: bool,
) -> Predictions:
    """Probabilities of one model on one split (``views`` > 1: test-time augmentation), in record order."""
    model.to(device)
    probs, labels, indices = [], [], []
    for batch in datamodule.eval_dataloader(split):
        probs.append(predict_proba_tta(model, batch["image"].to(device), views, calibrated).float().cpu())
        labels.append(batch["label"])
        indices.append(batch["index"])
    indices_t = torch.cat(indices)
    order = indices_t.argsort()
    return Predictions(torch.cat(probs)[order], torch.cat(labels)[order], indices_t[order])


def run_split_file(member: InferenceModel) -> Path | None:
    """The ``split.csv`` of the run folder the checkpoint sits in (None, with a warning, when it was moved)."""
    split_file = member.path.parent.parent / SPLIT_FILE
    if member.path.parent.name != CHECKPOINT_DIR or not split_file.is_file():
        log.warning("%s: no %s beside the checkpoint; its split was not checked", member.path, SPLIT_FILE)
        return None
    return split_file


def check_external_unseen(members: dict[str, InferenceModel], external: pd.DataFrame, source: str) -> None:
    """An external test set must hold no image or lesion a member learned from (its run's split.csv says which)."""
    for member in members.values():
        if (split_file := run_split_file(member)) is not None:
            seen = pd.read_csv(split_file, dtype={"image_id": str, "lesion_id": str}, keep_default_na=False)
            check_disjoint(seen[seen["split"] != "test"], external, f"{source} (against {split_file})")


def listed_split_file(members: dict[str, InferenceModel], split: str) -> Path:
    """split_from=file: the one ``split.csv`` whose ``split`` images every member was scored on in training."""
    files = {}
    for name, member in members.items():
        if (split_file := run_split_file(member)) is None:
            raise DataError(f"split_from=file needs the run's {SPLIT_FILE} beside {name}'s checkpoints/ folder")
        files[split_file] = set(read_run_split(split_file).query("split == @split")["image_id"])
    first, *others = files
    if any(files[other] != files[first] for other in others):
        raise DataError(f"the members' {SPLIT_FILE} files list different {split} images; evaluate them one by one")
    return first


def predict_members(
    members: dict[str, InferenceModel],
    settings: dict,
    split: str,
    device: torch.device,
    views: int,
    calibrated: bool,
    split_from: str = "data",
) -> tuple[dict[str, Predictions], pd.DataFrame, dict]:
    """Each member's predictions on the same records (one DataModule per distinct preprocessing), and how
    the records were checked against the runs' ``split.csv``."""
    external = split == "test" and bool(settings.get("test_set"))
    listed = listed_split_file(members, split) if split_from == "file" and not external else None
    datamodules: dict[Preprocessing, SkinLesionDataModule] = {}
    for member in members.values():
        pre = member.model.preprocessing
        if pre not in datamodules:
            datamodules[pre] = datamodule_for(settings, pre, split, listed)
    first_datamodule = next(iter(datamodules.values()))
    records = first_datamodule.records
    if external:  # checked before minutes of predicting
        check_external_unseen(members, records, str(settings["test_set"]["root"]))
        split_check = {"split_from": "external set", "checked_disjoint": True}
    elif listed is not None:
        split_check = first_datamodule.split_check
        log.info("%s: %d of the %d listed images found, %d not listed left out", listed, split_check["found"],
                 split_check["listed"], split_check["not_listed"])  # fmt: skip
    else:  # the run's own val/test: the data folder must still give the split each member was tested on
        checked = []
        for member in members.values():
            if (split_file := run_split_file(member)) is not None:
                check_same_split(datamodules[member.model.preprocessing].records, split_file)
                checked.append(str(split_file))
        split_check = {"split_from": "data", "same_as": checked}
    results = {}
    for name, member in members.items():
        results[name] = predict(member.model, datamodules[member.model.preprocessing], split, device, views, calibrated)
        log.info("%s: %d %s images", name, len(results[name].indices), split)
    first_name, first = next(iter(results.items()))
    for name, result in results.items():
        theirs = datamodules[members[name].model.preprocessing].records
        same_images = list(theirs.loc[result.indices.numpy(), "image_id"]) == list(
            records.loc[first.indices.numpy(), "image_id"]
        )
        if not (same_images and torch.equal(result.labels, first.labels)):
            raise DataError(f"ensemble member {name} saw other {split} images than {first_name}")
    return results, records, split_check


# ---- the entry point ---------------------------------------------------------------------------------
def _write(out_dir: Path, split: str, name: str, result: Predictions, records: pd.DataFrame, classes) -> dict:
    scored = records.loc[result.indices.numpy()]
    ids = scored["image_id"], scored["lesion_id"]
    metrics = write_split_artifacts(out_dir, split, result.probs, result.labels, *ids, classes, scored["lesion_known"])
    metrics[f"{split}/ece"] = expected_calibration_error(result.probs, result.labels)
    plot_reliability({name: (result.probs, result.labels)}, out_dir / f"reliability_{split}.png", title=split)
    return metrics


def _ensemble_gains(results: dict[str, Predictions], records: pd.DataFrame) -> pd.DataFrame:
    """Balanced accuracy of the ensemble minus each member's on the same images, lesion-bootstrapped in pairs."""
    ensemble = results[ENSEMBLE]
    labels, preds = ensemble.labels.numpy(), ensemble.probs.argmax(1).numpy()
    resamples = Resamples.draw(records.loc[ensemble.indices.numpy(), "lesion_id"])
    rows = []
    for name, member in results.items():
        if name != ENSEMBLE:
            gain = paired_difference(labels, preds, member.probs.argmax(1).numpy(), resamples, member.probs.shape[1])
            rows.append({"model": name, **{f"ensemble_gain_{k}": v for k, v in gain.items()}})
    return pd.DataFrame(rows)


def _write_scores(
    out_dir: Path,
    split: str,
    results: dict[str, Predictions],
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


def evaluate(cfg: DictConfig) -> dict:
    """Predict, score and write the artifacts; return the summary written to ``metrics.json``."""
    check_settings(cfg, EvaluateSettings)
    views = _check_settings(cfg)
    out_dir = Path(cfg.paths.output_dir)
    write_resolved_config(cfg, out_dir)
    members = load_members(cfg)
    first = next(iter(members.values()))
    settings = data_settings(cfg, first.data)
    split = cfg.split
    _check_same_split(members, settings, split)
    device = resolve_device(cfg.device)
    results, records, split_check = predict_members(
        members, settings, split, device, views, cfg.calibrated, cfg.split_from
    )
    if len(members) > 1:
        reference = next(iter(results.values()))  # every member scored the same records, in the same order
        average = torch.stack([r.probs for r in results.values()]).mean(dim=0)
        results = {ENSEMBLE: Predictions(average, reference.labels, reference.indices), **results}
    scored = records.loc[next(iter(results.values())).indices.numpy()]
    intervals = split_interval_method(scored)
    scores = _write_scores(out_dir, split, results, records, first.classes, intervals)

    external = settings.get("test_set") if split == "test" else None
    summary = {
        "task": "evaluate",
        "status": "completed",
        "run_dir": str(out_dir),
        "split": split,
        "dataset": external or {k: settings.get(k) for k in ("root", "layout", "subset", "split")},
        "images": len(next(iter(results.values())).indices),
        "split_check": split_check,  # how the images were matched to the runs' split.csv
        "tta_views": views,
        "calibrated": bool(cfg.calibrated),
        "ensemble": len(members) > 1,
        "metrics": next(iter(scores.values())),  # the ensemble's, or the single model's
        "interval_method": {split: intervals},  # lesions, or images where the set names no lesions
        "members": {
            name: {
                "checkpoint": str(m.path),
                "backbone": m.model.spec.name,
                "image_size": m.model.preprocessing.image_size,
                "temperature": float(m.model.temperature),
                "metrics": scores[name],
            }
            for name, m in members.items()
        },
    }
    write_json(out_dir / METRICS_FILE, summary)
    log.info("evaluation folder: %s", out_dir)
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name="evaluate")
def _hydra_main(cfg: DictConfig) -> float:
    summary = cli.run_task(evaluate, cfg)
    if not isinstance(summary, dict):
        return float("nan")
    return summary["metrics"].get(f"{cfg.split}/balanced_acc", float("nan"))


def main() -> None:
    cli.launch(_hydra_main)


if __name__ == "__main__":
    main()
