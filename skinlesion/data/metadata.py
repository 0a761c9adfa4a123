"""Patient metadata (age, sex, anatomical site) as one float vector per image, for the metadata fusion model.

The encoding is fixed, never fitted to a dataset: age as ``age / age_scale`` plus a missing flag, sex one-hot
over HAM10000's values and site one-hot over HAM10000's ``localization`` vocabulary, both ending in
``unknown``, which a missing, empty or unseen value falls into. :class:`MetadataSpec`, vocabularies included,
is saved with the model (hparams ``metadata``), so evaluate and predict encode as training did even if these
defaults change. A set without metadata (the ISIC 2018 layout, new photos) encodes every field as missing,
the very vector that field dropout (one field) and ``drop_all`` (every field at once) show the model in training.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from skinlesion.data.layouts import HAM_LOCALIZATIONS, HAM_SEXES
from skinlesion.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FIELDS = ("age", "sex", "site")
COLUMNS = {"age": "age", "sex": "sex", "site": "localization"}  # field -> column of HAM10000_metadata.csv
UNKNOWN = "unknown"
AGE_RANGE = (0.0, 120.0)  # years; outside it an age counts as missing
SETTING = "module.metadata"


@dataclass(frozen=True, kw_only=True)
class MetadataSpec:
    """The metadata option's settings and its encoding. The recipe's values (``fields``, ``hidden``,
    ``field_dropout``, ``drop_all``) are in ``conf/metadata/fusion.yaml`` only; ``drop_all`` defaults to 0 here
    because a checkpoint from before it lacks the key and was trained without it."""

    fields: tuple[str, ...]  # some of FIELDS
    hidden: int  # width of the MLP that embeds the metadata vector
    field_dropout: float  # in training, each field of each image is set to missing with this probability
    drop_all: float = 0.0  # in training, every field of an image is set to missing at once with this probability
    age_scale: float = 100.0
    sexes: tuple[str, ...] = HAM_SEXES
    sites: tuple[str, ...] = HAM_LOCALIZATIONS

    @classmethod
    def from_config(cls, values: Mapping | MetadataSpec) -> MetadataSpec:
        if isinstance(values, MetadataSpec):
            return values
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            known = ", ".join(cls.__dataclass_fields__)
            raise ConfigError(f"unknown {SETTING} setting(s) {', '.join(sorted(unknown))}; known: {known}")
        unset = [f.name for f in fields(cls) if f.default is MISSING and values.get(f.name) is None]
        if unset:
            raise ConfigError(
                f"{SETTING}.{unset[0]} is not set; switch the option on with metadata=fusion "
                "(conf/metadata/fusion.yaml)"
            )
        values = {k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for k, v in values.items()}
        spec = cls(**values)
        spec._check()
        return spec

    def _check(self) -> None:
        if not self.fields or len(set(self.fields)) != len(self.fields) or not set(self.fields) <= set(FIELDS):
            raise ConfigError(
                f"{SETTING}.fields=[{','.join(map(str, self.fields))}] is not allowed: give some of "
                f"{', '.join(FIELDS)}, each once"
            )
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 1:
            raise ConfigError(f"{SETTING}.hidden={self.hidden} is not allowed: it must be a width >= 1")
        for name in ("field_dropout", "drop_all"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise ConfigError(f"{SETTING}.{name}={value} is not allowed: it must be a probability in [0, 1)")
        if not isinstance(self.age_scale, int | float) or self.age_scale <= 0:
            raise ConfigError(f"{SETTING}.age_scale={self.age_scale} is not allowed: it must be > 0")
        for name in ("sexes", "sites"):
            if UNKNOWN not in getattr(self, name):
                raise ConfigError(f"{SETTING}.{name} must include '{UNKNOWN}' (missing and unseen values)")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def _width(self, field: str) -> int:
        return {"age": 2, "sex": len(self.sexes), "site": len(self.sites)}[field]

    @property
    def width(self) -> int:
        return sum(self._width(field) for field in self.fields)

    def field_slices(self) -> list[tuple[int, int]]:
        """(start, stop) of each field in the vector, in ``fields`` order: what field dropout replaces."""
        slices, start = [], 0
        for field in self.fields:
            slices.append((start, start + self._width(field)))
            start += self._width(field)
        return slices

    def missing_row(self) -> np.ndarray:
        """The vector of an image with no metadata at all."""
        return self.encode(pd.DataFrame(index=range(1)))[0]

    def unreadable(self, frame: pd.DataFrame) -> list[str]:
        """The given values (not empty) that encode as missing or ``unknown``: a typo here silently removes a
        field from an image, so a caller can say which."""
        found = []
        for field in self.fields:
            column = COLUMNS[field]
            if column not in frame:
                continue
            given = _text(frame[column])
            given = given[given != ""]
            if field == "age":
                bad = given[_ages(given)[1]]
            else:
                bad = given[~given.isin(self.sexes if field == "sex" else self.sites)]
            found += [f"{column}={value!r}" for value in dict.fromkeys(bad)]
        return found

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """float32 (rows, width) from the columns ``age``, ``sex``, ``localization`` that ``frame`` has."""
        parts = []
        for field in self.fields:
            column = COLUMNS[field]
            values = frame[column] if column in frame else pd.Series("", index=frame.index)
            if field == "age":
                years, missing = _ages(values)
                parts.append(np.stack([np.where(missing, 0.0, years / self.age_scale), missing], axis=1))
            else:
                parts.append(_one_hot(values, self.sexes if field == "sex" else self.sites))
        return np.concatenate(parts, axis=1).astype(np.float32)


def _text(values: pd.Series) -> pd.Series:
    """A sex or site column as the encoding compares it with its vocabulary."""
    return values.fillna("").astype(str).str.strip().str.lower()


def _ages(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Years as floats, and which count as missing (not a number, or outside AGE_RANGE)."""
    years = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    return years, ~((years >= AGE_RANGE[0]) & (years <= AGE_RANGE[1]))  # NaN included


def _one_hot(values: pd.Series, vocabulary: Sequence[str]) -> np.ndarray:
    text = _text(values)
    index = {value: i for i, value in enumerate(vocabulary)}
    rows = text.map(lambda v: index.get(v, index[UNKNOWN])).to_numpy(dtype=np.int64)
    return np.eye(len(vocabulary))[rows]


def read_metadata_table(path: str | Path) -> pd.DataFrame:
    """A metadata CSV for new images (``HAM10000_metadata.csv`` is one): ``image_id`` and any of ``age``, ``sex``,
    ``localization``, indexed by ``image_id``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"metadata_csv={path}: file not found; give a CSV with image_id and age, sex, localization")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DataError(f"metadata_csv={path}: cannot be read as CSV ({err})") from err
    frame.columns = [c.strip() for c in frame.columns]
    if "image_id" not in frame:
        raise DataError(
            f"metadata_csv={path}: no image_id column (the file name, with or without extension); found "
            f"{', '.join(frame.columns)}"
        )
    ids = frame["image_id"].str.strip()
    if ids.duplicated().any():
        raise DataError(f"metadata_csv={path}: image_id '{ids[ids.duplicated()].iloc[0]}' is listed twice")
    return frame.assign(image_id=ids).set_index("image_id")[[c for c in COLUMNS.values() if c in frame]]


def table_key(table: pd.DataFrame | None, path: Path) -> str | None:
    """The ``image_id`` of ``table`` that lists the file: its name, or its name without extension."""
    return next((k for k in (path.name, path.stem) if table is not None and k in table.index), None)


def rows_for_files(table: pd.DataFrame | None, paths: Sequence[Path]) -> pd.DataFrame:
    """The rows of ``table`` for ``paths``, in order; a file not listed, or no table, gets an empty row (every
    field missing)."""
    keys = [table_key(table, path) for path in paths]
    rows = [table.loc[key].to_dict() if key is not None else {} for key in keys]
    return pd.DataFrame(rows, index=range(len(paths)))


def warn_if_no_metadata(spec: MetadataSpec | None, encoded: np.ndarray | None, images: str) -> None:
    """Log once when a metadata model sees only the all-missing vector (``images``: which, for the message):
    its temperature and clinical thresholds were fitted on validation images that had metadata."""
    if spec is not None and len(encoded) and bool((encoded == spec.missing_row()).all()):
        log.warning(
            "%s: no image has metadata, so this metadata model sees every field missing; its temperature and "
            "clinical thresholds were fitted on validation images with metadata and may not hold here",
            images,
        )
