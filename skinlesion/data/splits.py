"""Leak-free train/val/test splits: stratified by diagnosis, grouped by lesion.

HAM10000 holds several photos of many lesions; splitting by image puts photos of one lesion on both
sides and inflates every metric. The default strategy groups by ``lesion_id`` with scikit-learn's
``StratifiedGroupKFold``; ``image_stratified`` groups by image instead, to reproduce the original
notebook's 80/20 split for comparison. Each hold-out fraction ``f`` is realised as one fold of
``k = round(1/f)`` folds (70/15/15 gives 71.4/14.3/14.3), so every class needs at least ``k`` lesions.
The test split is drawn first and does not depend on ``num_folds``/``fold``, so every fold of a
cross-validation is scored on the same test lesions. The result depends only on the records' ids,
labels and the seed: never on row order, file paths or the machine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from skinlesion.data.specs import SplitSpec
from skinlesion.errors import ConfigError, DataError, SplitChangedError
from skinlesion.labels import CLASSES

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _one_fold(labels: np.ndarray, groups: np.ndarray, n_splits: int, which: int, seed: int) -> np.ndarray:
    """Boolean mask of the rows in fold ``which`` of a stratified grouped ``n_splits``-fold split."""
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    held = list(splitter.split(np.zeros(len(labels)), labels, groups))[which][1]
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


def _require_groups(labels: np.ndarray, groups: np.ndarray, n_splits: int, setting: str, unit: str) -> None:
    per_class = pd.Series(groups).groupby(labels).nunique()
    short = per_class[per_class < n_splits]
    if not short.empty:
        detail = ", ".join(f"{CLASSES[c]} has {n}" for c, n in short.items())
        raise DataError(
            f"too few {unit}s per class for {setting} ({n_splits} folds need at least {n_splits} {unit}s in "
            f"every class): {detail}. Use more data, a larger fraction or fewer folds"
        )


def _folds_for(fraction: float, name: str, of: float = 1.0) -> int:
    """Folds whose one fold holds ``fraction`` of everything, drawn from the share ``of`` still unassigned."""
    if not 0 < fraction < 1:
        raise ConfigError(f"data.split.{name}={fraction:g} must be between 0 and 1 (exclusive)")
    return max(2, round(of / fraction))


def assign_splits(records: pd.DataFrame, spec: SplitSpec | None = None, **settings: Any) -> pd.Series:
    """'train'/'val'/'test' for each record (indexed like ``records``), by ``spec`` or else by the ``data.split``
    ``settings`` given as keywords (``seed=7``; the rest :class:`SplitSpec`'s defaults).

    ``test=0`` makes no test split (the caller may bring an external one). With ``num_folds`` the
    non-test records are cut into that many folds and fold ``fold`` is the validation split.
    """
    if spec is not None and settings:
        raise TypeError("assign_splits takes a SplitSpec or data.split settings as keywords, not both")
    spec = SplitSpec.from_config(settings) if spec is None else spec

    order = records.sort_values("image_id", kind="stable").index  # row order must not change the split
    ordered = records.loc[order]
    labels = ordered["label"].to_numpy()
    unit = "lesion" if spec.strategy == "lesion_grouped" else "image"
    groups = (ordered["lesion_id"] if unit == "lesion" else ordered["image_id"]).to_numpy()

    split = np.full(len(ordered), "train", dtype=object)
    if spec.test > 0:
        k = _folds_for(spec.test, "test")
        _require_groups(labels, groups, k, f"data.split.test={spec.test:g}", unit)
        split[_one_fold(labels, groups, k, 0, spec.seed)] = "test"
    rest = np.flatnonzero(split == "train")
    if spec.num_folds is not None:
        k, which, setting = spec.num_folds, spec.fold, f"data.split.num_folds={spec.num_folds}"
    else:
        k, which, setting = _folds_for(spec.val, "val", of=1 - spec.test), 0, f"data.split.val={spec.val:g}"
    _require_groups(labels[rest], groups[rest], k, setting, unit)
    split[rest[_one_fold(labels[rest], groups[rest], k, which, spec.seed)]] = "val"

    result = pd.Series(split, index=order, name="split").reindex(records.index)
    _warn_missing_classes(records, result)
    shares = result.value_counts(normalize=True).reindex(SPLITS, fill_value=0)
    log.info(
        "split (%s, seed %d%s): %s",
        spec.strategy,
        spec.seed,
        f", fold {spec.fold} of {spec.num_folds}" if spec.num_folds is not None else "",
        ", ".join(f"{name} {share:.1%}" for name, share in shares.items()),
    )
    return result


def check_disjoint(records: pd.DataFrame, external: pd.DataFrame, source: str) -> None:
    """An external test set must share no image and no lesion with the data the model learns from."""
    for column in ("image_id", "lesion_id"):
        shared = sorted(set(records[column]) & set(external[column]))
        if shared:
            raise DataError(
                f"{source}: {len(shared)} {column}(s) of the external test set are also in the training data "
                f"(first: {shared[0]}); a test set must be disjoint from it"
            )


def _warn_missing_classes(records: pd.DataFrame, split: pd.Series) -> None:
    present = set(records["label"])
    for name in SPLITS:
        have = set(records.loc[split == name, "label"])
        if have and present - have:
            log.warning("the %s split has no %s images", name, ", ".join(CLASSES[c] for c in sorted(present - have)))


def check_same_split(records: pd.DataFrame, split_file: Path) -> None:
    """Refuse records whose split differs from a run's ``split.csv``: images added to the data folder, images
    gone, or images in another split now would make "test" metrics partly training images."""
    main_saved = read_run_split(split_file)
    main_now = records[records["source"] == "main"] if "source" in records else records
    merged = main_saved[["image_id", "split"]].merge(
        main_now[["image_id", "split"]], on="image_id", how="outer", suffixes=("_run", "_now"), indicator=True
    )
    problems = []
    for label, rows, column in (
        ("added since the run", merged[merged["_merge"] == "right_only"], "split_now"),
        ("missing", merged[merged["_merge"] == "left_only"], "split_run"),
        ("in another split now", merged[(merged["_merge"] == "both") & (merged["split_run"] != merged["split_now"])],
         "split_run"),
    ):  # fmt: skip
        if not rows.empty:
            counts = ", ".join(f"{split} {n}" for split, n in rows[column].value_counts().sort_index().items())
            problems.append(f"{len(rows)} image(s) {label} ({counts})")
    if problems:
        raise SplitChangedError(
            f"the data no longer gives the split in {split_file}: {'; '.join(problems)}. Its val/test images would "
            "not be the ones the run was tested on; restore the data folder as it was for this run (evaluate: or "
            "split_from=file to score exactly the listed images that still exist)"
        )


def read_run_split(split_file: Path) -> pd.DataFrame:
    """The main dataset's rows of a run's ``split.csv`` (an external test set is never part of the split)."""
    saved = pd.read_csv(split_file, dtype={"image_id": str, "lesion_id": str}, keep_default_na=False)
    return saved[saved["source"] == "main"] if "source" in saved else saved


def split_from_file(records: pd.DataFrame, split_file: Path) -> tuple[pd.DataFrame, dict]:
    """The records a run's ``split.csv`` lists, in the split it gave them, and a count of what differs: images
    listed but gone, and images in the folder that the run never listed (left out)."""
    saved = read_run_split(split_file)
    split_of = saved.set_index("image_id")["split"]
    listed = records["image_id"].isin(split_of.index)
    kept = records[listed].reset_index(drop=True)
    kept["split"] = kept["image_id"].map(split_of)
    gone = saved[~saved["image_id"].isin(records["image_id"])]
    check = {
        "split_from": "file",
        "split_file": str(split_file),
        "listed": len(saved),
        "found": len(kept),
        "missing": {split: int(n) for split, n in gone["split"].value_counts().sort_index().items()},
        "not_listed": int((~listed).sum()),
    }
    return kept, check
