"""Checking that every listed image is a usable file before any training starts.

Bad files stop the run with one message that names the listing file, lines and reasons (and the CSV
with the full list), unless ``data.on_bad_image=skip``, which drops them, logs how many, and lets the
caller write the list into the run folder.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from skinlesion.data.images import DEFAULT_MAX_PIXELS, check_image_file
from skinlesion.errors import ConfigError, DataError
from skinlesion.runfolder.files import atomic_write

log = logging.getLogger(__name__)

ON_BAD_IMAGE = ("error", "skip")
BAD_COLUMNS = ["image_id", "source_row", "path", "reason"]


def find_bad_images(records: pd.DataFrame, max_pixels: int = DEFAULT_MAX_PIXELS, threads: int = 8) -> pd.DataFrame:
    """One row per unusable image (missing, empty, not an image, truncated, too large)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        reasons = list(pool.map(lambda p: check_image_file(p, max_pixels), records["path"]))
    bad = records.assign(reason=reasons)
    return bad[bad["reason"].notna()][BAD_COLUMNS].reset_index(drop=True)


def problem_counts(bad: pd.DataFrame) -> dict[str, int]:
    """Unusable images per kind of problem ("missing file": 4031, ...), largest first."""
    kinds = bad["reason"].str.split(" (", n=1, regex=False).str[0]
    return {str(kind): int(n) for kind, n in kinds.value_counts().items()}


def describe_bad_images(bad: pd.DataFrame, total: int, listing: str) -> str:
    summary = ", ".join(f"{kind}: {n:,}" for kind, n in problem_counts(bad).items())
    examples = "; ".join(f"line {row.source_row} {row.image_id}: {row.reason}" for row in bad.head(3).itertuples())
    return f"{listing}: {len(bad):,} of {total:,} listed images are unusable ({summary}). First: {examples}"


def apply_bad_image_policy(
    records: pd.DataFrame, bad: pd.DataFrame, on_bad_image: str, listing: str, full_list: Path | None = None
) -> pd.DataFrame:
    """Records without the bad images, or a DataError when the policy is ``error``."""
    check_policy(on_bad_image)
    if bad.empty:
        return records
    if len(bad) == len(records) and (bad["reason"] == "missing file").all():  # a wrong root, not bad files
        raise DataError(
            f"{listing}: none of the {len(records):,} listed images was found where the layout expects them "
            f"(e.g. {bad['path'].iloc[0]}); check data.root and that the image folders are inside it"
        )
    message = describe_bad_images(bad, len(records), listing)
    where = f"; the full list is in {full_list}" if full_list else ""
    if on_bad_image == "error":
        raise DataError(f"{message}{where}. Fix or remove them, or set data.on_bad_image=skip to train without them")
    log.warning("%s%s. Skipping them (data.on_bad_image=skip)", message, where)
    kept = records[~records["image_id"].isin(bad["image_id"])].reset_index(drop=True)
    if kept.empty:
        raise DataError(f"{listing}: the dataset is empty: all {len(records):,} listed images are unusable")
    return kept


def check_policy(on_bad_image: str) -> None:
    if on_bad_image not in ON_BAD_IMAGE:
        raise ConfigError(f"data.on_bad_image='{on_bad_image}' is not valid; choose one of {', '.join(ON_BAD_IMAGE)}")


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
