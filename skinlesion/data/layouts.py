"""Read a dataset folder into one table of records, whatever layout it was downloaded in.

Every layout becomes the same frame: ``image_id, lesion_id, lesion_known, dx, label, path, source_row``
plus, where the metadata has them, HAM10000's patient and image columns :data:`METADATA_COLUMNS` (the
subgroup audit reads them; ISIC 2018's one-hot CSVs have none), with ``label`` the index into
:data:`skinlesion.labels.CLASSES`, ``lesion_known`` false where the dataset names no lesion and the image
stands for its own (ISIC 2018 without ``*_LesionGroupings.csv``: a bootstrap over such "lesions" resamples
images) and ``source_row`` the line of the CSV the record came from (for
error messages). Table-level problems raise :class:`DataError` at once naming the
file and line; problems with the image files themselves are found by :mod:`skinlesion.data.bad_images`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pandas as pd

from skinlesion.errors import ConfigError, DataError
from skinlesion.labels import CLASS_TO_INDEX, CLASSES, ISIC_COLUMNS

log = logging.getLogger(__name__)

HAM_METADATA = "HAM10000_metadata.csv"
HAM_REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
ISIC_SUBSETS = ("Training", "Validation", "Test")
LAYOUTS = ("auto", "ham10000", "isic2018")
GET_DATA_HINT = (
    "Download HAM10000 from https://doi.org/10.7910/DVN/DBW86T (or Kaggle 'skin-cancer-mnist-ham10000'), "
    "or the ISIC 2018 Task 3 set with `python -m skinlesion.data.download`, "
    "then point data.root (or $SKINLESION_DATA_ROOT) at it; data=synthetic runs without a download"
)
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
RECORD_COLUMNS = ["image_id", "lesion_id", "lesion_known", "dx", "label", "path", "source_row"]
# Carried as text when the metadata has them: who the patient is, where the lesion is, which clinic and
# device took the photo, and how the diagnosis was confirmed (what the subgroup audit splits by).
METADATA_COLUMNS = ("sex", "age", "localization", "dataset", "dx_type")
# HAM10000's vocabulary of two of them (HAM10000_metadata.csv), "unknown" included: what the subgroup audit
# expects and what the metadata fusion model one-hot encodes (skinlesion.data.metadata).
HAM_SEXES = ("male", "female", "unknown")
HAM_LOCALIZATIONS = (
    "abdomen",
    "acral",
    "back",
    "chest",
    "ear",
    "face",
    "foot",
    "genital",
    "hand",
    "lower extremity",
    "neck",
    "scalp",
    "trunk",
    "upper extremity",
    "unknown",
)
_warned_no_groupings: set[Path] = set()  # each missing groupings file is reported once per process


def isic_paths(root: Path, subset: str) -> tuple[Path, Path, Path]:
    """(image folder, ground-truth CSV, lesion-groupings CSV) of an ISIC 2018 Task 3 subset."""
    stem = f"ISIC2018_Task3_{subset}"
    truth = root / f"{stem}_GroundTruth" / f"{stem}_GroundTruth.csv"
    if not truth.is_file() and (root / f"{stem}_GroundTruth.csv").is_file():
        truth = root / f"{stem}_GroundTruth.csv"
    groupings = root / f"{stem}_LesionGroupings.csv"  # the challenge publishes it as a separate CSV
    if not groupings.is_file():
        groupings = truth.parent / groupings.name
    return root / f"{stem}_Input", truth, groupings


def detect_layout(root: Path) -> str:
    if (root / HAM_METADATA).is_file():
        return "ham10000"
    if any(isic_paths(root, subset)[0].is_dir() for subset in ISIC_SUBSETS):
        return "isic2018"
    raise DataError(
        f"{root}: no dataset found: expected {HAM_METADATA} (HAM10000/Kaggle layout) or "
        f"ISIC2018_Task3_*_Input/ folders (ISIC 2018 layout). {GET_DATA_HINT}"
    )


def load_records(root: str | Path, layout: str = "auto", subset: str = "Training") -> pd.DataFrame:
    """The records of the dataset at ``root``; ``subset`` picks the ISIC 2018 part."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root.resolve()}. {GET_DATA_HINT}")
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown data.layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(root)
    records = load_ham10000(root) if layout == "ham10000" else load_isic2018(root, subset)
    listing = root / HAM_METADATA if layout == "ham10000" else isic_paths(root, subset)[1]
    if records.empty:
        raise DataError(f"{listing}: the dataset is empty (no image is listed)")
    records.attrs["listing"] = str(listing)  # the file error messages name, with source_row
    return records


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{path}: cannot be read as CSV ({err}); re-download or fix the file") from err
    frame.columns = [c.strip() for c in frame.columns]
    return frame


def _require_columns(frame: pd.DataFrame, path: Path, required) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing required column(s) {', '.join(missing)}; found {', '.join(frame.columns)}")


def index_images(root: Path) -> dict[str, Path]:
    """image stem -> path, over ``root`` and its immediate sub-folders (the part_1/part_2 split)."""
    found: dict[str, Path] = {}
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))]
    for folder in folders:
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                stem, dot, suffix = name.rpartition(".")
                if dot and "." + suffix.lower() in IMAGE_SUFFIXES and stem not in found:
                    found[stem] = Path(entry.path)
    return found


def _check_ids(frame: pd.DataFrame, path: Path, id_column: str, root: Path) -> None:
    ids = frame[id_column].str.strip()
    for i, image_id in enumerate(ids):
        line = i + 2  # header is line 1
        if not image_id:
            raise DataError(f"{path} line {line}: empty {id_column}")
        if not _SAFE_ID.match(image_id) or ".." in image_id:
            raise DataError(
                f"{path} line {line}: {id_column} '{image_id}' would resolve outside the data root {root}; "
                "image ids must be plain file names (letters, digits, '_', '-', '.')"
            )
    duplicated = ids[ids.duplicated(keep="first")]
    if not duplicated.empty:
        i = int(duplicated.index[0])
        first = int(ids[ids == duplicated.iloc[0]].index[0])
        raise DataError(
            f"{path} line {i + 2}: duplicate {id_column} '{duplicated.iloc[0]}' (first at line {first + 2}); "
            f"{len(duplicated)} duplicate row(s) in all — remove them"
        )


def _check_one_dx_per_lesion(records: pd.DataFrame, path: Path) -> None:
    """A lesion with two diagnoses is a labelling error, and it cannot be stratified by one class."""
    per_lesion = records.groupby("lesion_id")["dx"].nunique()
    conflicting = per_lesion[per_lesion > 1]
    if conflicting.empty:
        return
    rows = records[records["lesion_id"] == conflicting.index[0]]
    listed = ", ".join(f"line {row.source_row} {row.dx}" for row in rows.itertuples())
    raise DataError(
        f"{path}: lesion_id '{conflicting.index[0]}' is listed with different diagnoses ({listed}); "
        f"{len(conflicting)} lesion(s) in all — give each lesion one dx or split it into separate lesion ids"
    )


def _attach_paths(frame: pd.DataFrame, image_root: Path) -> pd.DataFrame:
    images = index_images(image_root)
    frame["path"] = [str(images[i]) if i in images else str(image_root / f"{i}.jpg") for i in frame["image_id"]]
    return frame


def _records(
    image_ids: pd.Series,
    lesion_ids: pd.Series,
    dx: pd.Series,
    table: Path,
    image_root: Path,
    lesion_known: pd.Series | bool = True,
    metadata: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The loaders' common result (rows of ``table``, checked), with each image's path under ``image_root``
    and the :data:`METADATA_COLUMNS` that ``metadata`` (rows of ``table``) has."""
    records = pd.DataFrame(
        {
            "image_id": image_ids,
            "lesion_id": lesion_ids,
            "lesion_known": lesion_known,
            "dx": dx,
            "label": dx.map(CLASS_TO_INDEX).astype(int),
            "source_row": image_ids.index + 2,  # the header is line 1
        }
    )
    _check_one_dx_per_lesion(records, table)
    extra = [c for c in METADATA_COLUMNS if metadata is not None and c in metadata]
    for column in extra:
        records[column] = metadata[column].str.strip()
    return _attach_paths(records, image_root)[RECORD_COLUMNS + extra]


def load_ham10000(root: Path) -> pd.DataFrame:
    """The Kaggle/Dataverse HAM10000 download: metadata CSV plus images in any sub-folder of ``root``."""
    meta = root / HAM_METADATA
    if not meta.is_file():
        raise DataError(f"metadata file not found: {meta}. {GET_DATA_HINT}")
    frame = _read_csv(meta)
    _require_columns(frame, meta, HAM_REQUIRED_COLUMNS)
    _check_ids(frame, meta, "image_id", root)
    dx = frame["dx"].str.strip().str.lower()
    unknown = ~dx.isin(CLASSES)
    if unknown.any():
        i = int(unknown.idxmax())
        raise DataError(
            f"{meta} line {i + 2}: unknown dx '{frame['dx'][i]}' for image_id {frame['image_id'][i]}; "
            f"expected one of {', '.join(CLASSES)} ({int(unknown.sum())} row(s) affected)"
        )
    lesion = frame["lesion_id"].str.strip()
    empty = lesion == ""
    if empty.any():
        i = int(empty.idxmax())
        raise DataError(f"{meta} line {i + 2}: empty lesion_id for image_id {frame['image_id'][i]}")
    return _records(frame["image_id"].str.strip(), lesion, dx, meta, root, metadata=frame)


def load_isic2018(root: Path, subset: str = "Training") -> pd.DataFrame:
    """An ISIC 2018 Task 3 subset: one-hot ground truth mapped onto CLASSES by column name."""
    if subset not in ISIC_SUBSETS:
        raise ConfigError(f"unknown ISIC 2018 subset '{subset}'; choose one of {', '.join(ISIC_SUBSETS)}")
    images, truth, groupings = isic_paths(root, subset)
    if not truth.is_file():
        raise DataError(f"ground-truth file not found: {truth}. {GET_DATA_HINT}")
    if not images.is_dir():
        raise DataError(f"image folder not found: {images}. {GET_DATA_HINT}")
    frame = _read_csv(truth)
    _require_columns(frame, truth, ("image", *ISIC_COLUMNS))
    _check_ids(frame, truth, "image", root)
    try:
        onehot = frame[list(ISIC_COLUMNS)].astype(float)
    except ValueError as err:
        raise DataError(f"{truth}: class columns must hold 0/1 values ({err})") from err
    ones = onehot.sum(axis=1)
    bad = ~((onehot.isin([0.0, 1.0]).all(axis=1)) & (ones == 1))
    if bad.any():
        i = int(bad.idxmax())
        raise DataError(
            f"{truth} line {i + 2}: image {frame['image'][i]} must have exactly one class set to 1 "
            f"in {', '.join(ISIC_COLUMNS)}"
        )
    dx = onehot.idxmax(axis=1).map(ISIC_COLUMNS)
    image_ids = frame["image"].str.strip()
    mapping = {}
    if groupings.is_file():
        groups = _read_csv(groupings)
        _require_columns(groups, groupings, ("image", "lesion_id"))
        mapping = dict(zip(groups["image"].str.strip(), groups["lesion_id"].str.strip(), strict=True))
    else:
        _warn_no_groupings(groupings, subset)
    known = image_ids.map(lambda i: bool(mapping.get(i)))
    lesion_ids = image_ids.where(~known, image_ids.map(mapping))
    return _records(image_ids, lesion_ids, dx, truth, images, known)


def _warn_no_groupings(groupings: Path, subset: str) -> None:
    """Once per file: every call (train, evaluate, one data module per preprocessing) reads it again."""
    if groupings in _warned_no_groupings:
        return
    _warned_no_groupings.add(groupings)
    # a split needs lesions to keep photos together; Validation/Test need them for the intervals
    consequence = (
        "a grouped split cannot keep photos of one lesion together"
        if subset == "Training"
        else "its bootstrap intervals resample images, not lesions (narrower where a lesion has several photos)"
    )
    log.warning(
        "%s not found: each image is treated as its own lesion, so %s (python -m skinlesion.data.download fetches it)",
        groupings.name,
        consequence,
    )
