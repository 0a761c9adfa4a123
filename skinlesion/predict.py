"""Class probabilities for new images, with the checkpoint's own preprocessing and calibration.

    python -m skinlesion.predict ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt input=photos/
    python -m skinlesion.predict ckpt_path=... input=lesion.jpg tta=true out=lesion.csv

One CSV row per file: ``path``, ``pred``, ``confidence``, ``top3``, ``prob_<class>`` for every class, and
``error``, which says why a file could not be read (its other columns are then empty): a bad file never
stops the batch. Probabilities are temperature-scaled with the temperature fitted on the validation
split after training (``calibrated=false`` for the raw softmax); ``tta=true`` averages them over flips
and 90-degree rotations. An existing output file is never replaced. :func:`predict` is the plain
function; ``main`` is the thin Hydra wrapper.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from skinlesion import cli
from skinlesion.data.images import ImageReadError
from skinlesion.errors import ConfigError
from skinlesion.inference.model import InferenceModel, list_images, required_path
from skinlesion.inference.predictions import PROB_PREFIX
from skinlesion.inference.topk import decision
from skinlesion.inference.tta import tta_views
from skinlesion.runfolder.files import atomic_write, check_writable, write_json
from skinlesion.settings import PredictSettings, check_settings

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.csv"
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


def _rows(model: InferenceModel, paths: list[Path], probs: torch.Tensor) -> list[dict]:
    classes = model.classes
    return [
        {"path": str(path)}
        | decision(p, classes)
        | {f"{PROB_PREFIX}{name}": float(v) for name, v in zip(classes, p, strict=True)}
        | {"error": ""}
        for path, p in zip(paths, probs.numpy(), strict=True)
    ]


def predict_files(
    model: InferenceModel, paths: list[Path], tta_views: int = 1, calibrated: bool = True, batch_size: int = 32
) -> pd.DataFrame:
    """One row per path, in order; an unreadable file gets its reason in ``error`` and no probabilities."""
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
        probs = model.predict_proba(torch.stack(inputs), tta_views, calibrated) if inputs else torch.empty(0)
        predicted = dict(zip(readable, _rows(model, readable, probs), strict=True))
        rows += [
            predicted.get(path) or {"path": str(path), "error": errors[path]}
            for path in paths[start : start + batch_size]
        ]
    columns = ["path", "pred", "confidence", "top3", *(f"{PROB_PREFIX}{c}" for c in model.classes), "error"]
    return pd.DataFrame(rows, columns=columns)


def predict(cfg: DictConfig) -> pd.DataFrame:
    """Predict every image of ``cfg.input`` and write the CSV; returns its rows."""
    check_settings(cfg, PredictSettings)
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = required_path(cfg.ckpt_path, "ckpt_path", USAGE)
    source = required_path(cfg.input, "input", USAGE)
    views = tta_views(cfg.tta, cfg.tta_views)
    target = output_path(cfg.out, run_dir)
    paths = list_images(source)
    model = InferenceModel.load(ckpt_path, cfg.device)

    frame = predict_files(model, paths, views, bool(cfg.calibrated), int(cfg.batch_size))
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
            "tta_views": views,
            "class_counts": frame["pred"].value_counts().to_dict(),
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
