"""Class probabilities for new images, with the checkpoint's own preprocessing and calibration.

    python -m skinlesion.predict ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt input=photos/
    python -m skinlesion.predict ckpt_path=... input=lesion.jpg tta=true out=lesion.csv

One CSV row per file: ``path``, ``pred``, ``confidence``, ``top3``, ``prob_<class>`` for every class, the
clinical decisions (``prediction_set``, ``melanoma_flag``, ``malignant_flag``, ``abstain``, ``ood_score``,
``ood_flag``: thresholds refitted for ``clinical.*`` on the validation predictions ``best.ckpt`` stores,
empty with one warning for a checkpoint that stores none), and ``error``, which says why a file could not
be read (its other columns are then empty): a bad file never stops the batch. Probabilities are
temperature-scaled with the temperature fitted on the validation split after training
(``calibrated=false`` for the raw softmax); ``tta=true`` averages them over flips and 90-degree
rotations, ``tta_crops``/``tta_scales`` over ordered crops of the image enlarged. An existing output file
is never replaced. :func:`predict` is the plain function; ``main`` is the thin Hydra wrapper.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from skinlesion import cli
from skinlesion.clinical.thresholds import DECISION_COLUMNS, Thresholds
from skinlesion.data.images import ImageReadError
from skinlesion.data.metadata import table_key
from skinlesion.errors import ConfigError
from skinlesion.inference.model import InferenceModel, list_images, required_path
from skinlesion.inference.predictions import PROB_PREFIX, probabilities
from skinlesion.inference.topk import decision
from skinlesion.inference.tta import ViewPlan, view_plan
from skinlesion.runfolder.files import atomic_write, check_writable, write_json
from skinlesion.settings import PredictSettings, check_settings

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.csv"
NO_TTA = ViewPlan()  # each image once, as it is
SHOWN_ROWS = 20  # printed to the terminal; the CSV has them all
USAGE = "python -m skinlesion.predict ckpt_path=<run>/checkpoints/best.ckpt input=FILE_OR_FOLDER"


def output_path(out: str | None, run_dir: Path) -> Path:
    """``out`` if given (it must not exist yet, and its folder must be writable), else ``predictions.csv`` in
    the run folder."""
    path = Path(out).expanduser() if out else run_dir / PREDICTIONS_FILE
    if path.exists():
        raise ConfigError(f"out={path} already exists; predict never overwrites results: give a new path")
    check_writable(path.parent, f"out={out}" if out else "paths.output_dir")
    return path


def _rows(model: InferenceModel, paths: list[Path], probs: torch.Tensor, decisions: pd.DataFrame | None) -> list[dict]:
    classes = model.classes
    clinical = decisions.to_dict("records") if decisions is not None else [{}] * len(paths)
    return [
        {"path": str(path)}
        | decision(p, classes)
        | {f"{PROB_PREFIX}{name}": float(v) for name, v in zip(classes, p, strict=True)}
        | extra
        | {"error": ""}
        for path, p, extra in zip(paths, probs.numpy(), clinical, strict=True)
    ]


def _probabilities(
    model: InferenceModel, images: torch.Tensor, views: ViewPlan, calibrated: bool, metadata: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and the identity view's raw logits (the OOD score's), in one pass without TTA."""
    logits = model.logits(images, metadata)
    if views.count > 1:
        return model.predict_proba(images, views, calibrated, metadata), logits
    return probabilities(logits, model.model.temperature.cpu() if calibrated else 1.0), logits


def predict_files(
    model: InferenceModel,
    paths: list[Path],
    views: ViewPlan = NO_TTA,
    calibrated: bool = True,
    batch_size: int = 32,
    thresholds: Thresholds | None = None,
    metadata: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per path, in order; an unreadable file gets its reason in ``error`` and no probabilities.
    ``thresholds``: the clinical decisions' (None: those columns empty), always applied to the single-view,
    temperature-scaled probabilities they were fitted on, whatever ``views`` and ``calibrated`` say of the
    ``prob_*`` columns. ``metadata``: a metadata model's table of the files (:meth:`InferenceModel.metadata_table`;
    a file not in it, or no table: every field missing)."""
    rows = []
    for start in range(0, len(paths), batch_size):
        readable, inputs, errors = [], [], {}
        for path in paths[start : start + batch_size]:
            try:
                inputs.append(model.load_input(path))
                readable.append(path)
            except ImageReadError as err:
                errors[path] = str(err)
                log.warning("%s: %s", path, err)
        predicted = {}
        if inputs:
            encoded = model.metadata_for(readable, metadata)
            probs, logits = _probabilities(model, torch.stack(inputs), views, calibrated, encoded)
            decided = None
            if thresholds is not None:  # on the scale they were fitted on: one view, temperature-scaled
                fitted_scale = probabilities(logits, model.model.temperature.cpu()).numpy()
                decided = thresholds.decisions(fitted_scale, logits.numpy(), [p.stem for p in readable])
            predicted = dict(zip(readable, _rows(model, readable, probs, decided), strict=True))
        rows += [
            predicted.get(path) or {"path": str(path), "error": errors[path]}
            for path in paths[start : start + batch_size]
        ]
    probs = (f"{PROB_PREFIX}{c}" for c in model.classes)
    columns = ["path", "pred", "confidence", "top3", *probs, *DECISION_COLUMNS, "error"]
    return pd.DataFrame(rows, columns=columns)


def _thresholds(model: InferenceModel, cfg: DictConfig) -> Thresholds | None:
    """Fitted for ``clinical.*`` (null: as trained) on the validation predictions the checkpoint stores."""
    if model.clinical is None:
        log.warning(
            "%s stores no validation predictions (trained before they were), so %s are left empty; retrain to get them",
            model.path,
            ", ".join(DECISION_COLUMNS),
        )
        return None
    return Thresholds.fit(model.clinical, model.clinical.settings.overridden(cfg.clinical))


def _metadata_summary(
    model: InferenceModel, table: pd.DataFrame | None, paths: list[Path], source: str | None
) -> dict | None:
    """For a metadata model: the CSV given and how many files it listed (the others had every field missing)."""
    if model.model.metadata_spec is None:
        return None
    listed = sum(table_key(table, path) is not None for path in paths)
    return {"file": str(source) if source else None, "images_listed": int(listed), "images": len(paths)}


def predict(cfg: DictConfig) -> pd.DataFrame:
    """Predict every image of ``cfg.input`` and write the CSV; returns its rows."""
    check_settings(cfg, PredictSettings)
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = required_path(cfg.ckpt_path, "ckpt_path", USAGE)
    source = required_path(cfg.input, "input", USAGE)
    views = view_plan(cfg.tta, cfg.tta_views, cfg.tta_crops, cfg.tta_scales)
    target = output_path(cfg.out, run_dir)
    paths = list_images(source)
    model = InferenceModel.load(ckpt_path, cfg.device)
    metadata = model.metadata_table(cfg.metadata_csv)
    model.warn_if_no_metadata(paths, metadata, cfg.metadata_csv)
    thresholds = _thresholds(model, cfg)

    frame = predict_files(model, paths, views, bool(cfg.calibrated), int(cfg.batch_size), thresholds, metadata)
    atomic_write(target, lambda tmp: frame.to_csv(tmp, index=False))
    failed = int((frame["error"] != "").sum())
    write_json(
        run_dir / "predict.json",
        {
            "checkpoint": str(ckpt_path),
            "input": str(source),
            "predictions": str(target),
            "images": len(frame),
            "failed": failed,
            "calibrated": bool(cfg.calibrated),
            "temperature": float(model.model.temperature),  # applied only when calibrated
            "tta_views": views.count,
            "tta": views.to_dict(),  # flips/rotations x (crops per scale above 1, or the image at scale 1)
            "metadata": _metadata_summary(model, metadata, paths, cfg.metadata_csv),
            "class_counts": frame["pred"].value_counts().to_dict(),
            "clinical": thresholds.to_dict() if thresholds is not None else None,
            # what the decision columns were computed from, whatever tta/calibrated did to the prob_* columns
            "clinical_applied_to": "single-view temperature-scaled probabilities, as the thresholds were fitted",
        },
    )
    log.info("%d images predicted, %d unreadable; predictions in %s", len(frame) - failed, failed, target)
    return frame


def _show(frame: pd.DataFrame, cfg: DictConfig) -> None:
    shown = frame.head(SHOWN_ROWS)[["path", "top3", "error"]].fillna("")
    print(shown.to_string(index=False, max_colwidth=70))
    if len(frame) > SHOWN_ROWS:
        print(f"... {len(frame) - SHOWN_ROWS} more rows in the CSV")


main = cli.hydra_command(predict, "predict", _show)

if __name__ == "__main__":
    main()
