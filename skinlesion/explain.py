"""Grad-CAM explanations of a trained checkpoint, for your images or for a split of its dataset.

    python -m skinlesion.explain ckpt_path=<run>/checkpoints/best.ckpt images=photos/ [method=gradcam++]
    python -m skinlesion.explain ckpt_path=<run>/checkpoints/best.ckpt split=test per_class=4

With ``images`` (a file or folder): one figure per image in ``<run>/images/`` (original with its true
label when the checkpoint's dataset knows the image, heatmap overlay, top-3 probabilities). Without:
per true class of the split, the most confident correct and wrong predictions side by side
(``gallery_<class>.png``) plus a figure per shown image. Either way ``explanations.csv`` lists the
images explained (for a split, those the galleries show) with their predictions. Heatmaps, figures and
galleries come from the :mod:`skinlesion.gradcam` package. :func:`explain` is the plain function; ``main``
is the thin Hydra wrapper.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from skinlesion import cli
from skinlesion.data.images import ImageReadError
from skinlesion.errors import CheckpointError, ConfigError
from skinlesion.gradcam.explanation import Explanation, explanation_row
from skinlesion.gradcam.figures import plot_explanation
from skinlesion.gradcam.gallery import GallerySettings, write_split_gallery
from skinlesion.gradcam.maps import check_method, compute_cams
from skinlesion.inference.model import InferenceModel, list_images, required_path
from skinlesion.inference.split import SCORED_SPLITS, datamodule_for, predict_split
from skinlesion.runfolder.files import write_json
from skinlesion.settings import ExplainSettings, check_settings

log = logging.getLogger(__name__)

TABLE_FILE = "explanations.csv"
USAGE = "python -m skinlesion.explain ckpt_path=<run>/checkpoints/best.ckpt [images=FILE_OR_DIR | split=val]"


def explain_images(
    loaded: InferenceModel,
    paths: list[Path],
    out_dir: Path,
    method: str = "gradcam",
    calibrated: bool = True,
    batch_size: int = 16,
    metadata: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One figure per readable image in ``out_dir/images``; a row per path (unreadable: ``error``). ``metadata``:
    a metadata model's table of the images (:meth:`InferenceModel.metadata_table`; unlisted: all missing)."""
    known = loaded.labels_by_image_id()
    classes, pre = loaded.classes, loaded.model.preprocessing
    rows = []
    for start in range(0, len(paths), batch_size):
        chunk, originals, done = paths[start : start + batch_size], {}, {}
        for path in chunk:
            try:
                originals[path] = loaded.read(path)
            except ImageReadError as err:
                done[path] = {"path": str(path), "error": str(err)}
        readable = [path for path in chunk if path in originals]
        if readable:
            inputs = torch.stack([loaded.load_input(path) for path in readable])
            encoded = loaded.metadata_for(readable, metadata)
            probs = loaded.predict_proba(inputs, calibrated=calibrated, metadata=encoded).numpy()
            cams = compute_cams(loaded.model, inputs, method, targets=probs.argmax(1).tolist(), metadata=encoded)
            for path, p, cam in zip(readable, probs, cams, strict=True):
                item = Explanation.build(
                    path.name, originals[path], cam, p, pre, loaded.center_crop, known.get(path.stem)
                )
                panel = out_dir / "images" / f"{start + chunk.index(path):04d}_{path.stem}.png"
                plot_explanation(item, classes, panel, method)
                done[path] = {"path": str(path)} | explanation_row(item, classes) | {"panel": str(panel), "error": ""}
        rows += [done[path] for path in chunk]
    return pd.DataFrame(rows)


def explain_split(
    loaded: InferenceModel,
    split: str,
    out_dir: Path,
    per_class: int,
    method: str = "gradcam",
    calibrated: bool = True,
    data_root: str | None = None,
) -> pd.DataFrame:
    """Galleries of the checkpoint's own ``split``, rebuilt from the data settings it carries (``data_root``
    if the dataset moved), predicted as ``skinlesion.evaluate`` predicts it."""
    if split not in SCORED_SPLITS:
        raise ConfigError(f"split={split} is not valid; choose one of {', '.join(SCORED_SPLITS)}")
    if not loaded.data:
        raise CheckpointError(f"{loaded.path}: has no saved data settings; give images=FILE_OR_DIR instead")
    settings = loaded.data | ({"root": data_root} if data_root else {})
    datamodule = datamodule_for(settings, loaded.model.preprocessing, split, metadata=loaded.model.metadata_spec)
    result = predict_split(loaded.model, datamodule, split, loaded.model.device, views=1, calibrated=calibrated)
    return write_split_gallery(
        loaded.model,
        datamodule.datasets[split],
        result,
        datamodule.records,
        out_dir,
        GallerySettings(per_class, method, loaded.center_crop, panels=True),
    )


def explain(cfg: DictConfig) -> dict:
    """Write the figures and ``explanations.csv`` into the run folder; returns what was written."""
    check_settings(cfg, ExplainSettings)
    if cfg.metadata_csv and not cfg.images:
        raise ConfigError(
            f"metadata_csv={cfg.metadata_csv} is for images=...; a split is explained with its dataset's own "
            "metadata: drop metadata_csv, or give images=FILE_OR_DIR"
        )
    run_dir = Path(cfg.paths.output_dir)
    method = check_method(cfg.method)
    loaded = InferenceModel.load(required_path(cfg.ckpt_path, "ckpt_path", USAGE), cfg.device)
    metadata = loaded.metadata_table(cfg.metadata_csv)
    if cfg.images:
        paths = list_images(cfg.images)[: cfg.n or None]
        loaded.warn_if_no_metadata(paths, metadata, cfg.metadata_csv)
        table = explain_images(loaded, paths, run_dir, method, bool(cfg.calibrated), int(cfg.batch_size), metadata)
    else:
        table = explain_split(
            loaded, cfg.split, run_dir, int(cfg.per_class), method, bool(cfg.calibrated), cfg.data_root
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(run_dir / TABLE_FILE, index=False)
    summary = {
        "checkpoint": str(loaded.path),
        "backbone": loaded.model.spec.name,
        "method": method,
        "source": str(cfg.images) if cfg.images else f"split {cfg.split}",
        "images": len(table),
        "failed": int((table.get("error", pd.Series(dtype=str)).fillna("") != "").sum()),
        "table": str(run_dir / TABLE_FILE),
        "figures": sorted(str(p) for p in run_dir.rglob("*.png")),
    }
    write_json(run_dir / "explain.json", summary)
    explained = summary["images"] - summary["failed"]
    log.info("%d images explained with %s; figures in %s", explained, method, run_dir)
    return summary


def _show(summary: dict, cfg: DictConfig) -> None:
    unreadable = f", {summary['failed']} unreadable" if summary["failed"] else ""
    print(f"{summary['images']} images ({summary['method']}{unreadable}): {summary['table']}")


main = cli.hydra_command(explain, "explain", _show)

if __name__ == "__main__":
    main()
