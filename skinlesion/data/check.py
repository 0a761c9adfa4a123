"""Check a dataset before training, with the DataModule's own checks, and print what was found.

    python -m skinlesion.data.check data.root=/data/HAM10000
    python -m skinlesion.data.check data=isic2018 data.root=/data/ISIC2018 data.split.num_folds=5 data.split.fold=0

Prints images and lesions per class, images per split and every problem found (unusable images by
kind, a split that cannot be made), writes ``check.json`` and ``bad_images.csv`` into the run folder,
and exits with status 1 when there are problems (2 when the dataset cannot be read at all).
:func:`check_data` is the plain function; ``main`` is the thin Hydra wrapper.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from skinlesion import cli
from skinlesion.data.bad_images import BAD_COLUMNS, problem_counts, write_csv
from skinlesion.data.datamodule import BAD_FILE, SkinLesionDataModule
from skinlesion.data.splits import SPLITS
from skinlesion.errors import DataError
from skinlesion.labels import CLASSES
from skinlesion.runfolder.files import write_json

log = logging.getLogger(__name__)

SUMMARY_FILE = "check.json"
EXIT_PROBLEMS = 1


def check_data(cfg: DictConfig) -> dict:
    """Read, check and split ``cfg.data`` as training would; the summary (also printed and saved)."""
    # Skip bad images so that every problem is listed at once; no cache: checking decodes nothing.
    datamodule: SkinLesionDataModule = instantiate(
        cfg.data, on_bad_image="skip", cache={"enabled": False}, generate_synthetic=False
    )
    records = datamodule.read_records()
    bad = datamodule.skipped if datamodule.skipped is not None else pd.DataFrame(columns=[*BAD_COLUMNS, "dataset"])
    problems = [
        {"dataset": dataset, "problem": kind, "count": count}
        for dataset, rows in bad.groupby("dataset", sort=False)
        for kind, count in problem_counts(rows).items()
    ]
    try:
        records["split"] = datamodule.assign_split(records)
    except DataError as err:
        problems.append({"dataset": "split", "problem": str(err), "count": None})
        records["split"] = None

    summary = {
        "status": "problems" if problems else "ok",
        "root": str(cfg.data.root),
        "images_listed": int(len(records) + len(bad)),
        "images_usable": len(records),
        "per_class": _per_class(records),
        "per_split": _per_split(records),
        "split": datamodule.split_settings.to_dict(),
        "problems": problems,
    }
    out = Path(cfg.paths.output_dir)
    write_json(out / SUMMARY_FILE, summary)
    if not bad.empty:
        write_csv(bad, out / BAD_FILE)
    print(format_summary(summary, out / BAD_FILE if not bad.empty else None))
    return summary


def _per_class(records: pd.DataFrame) -> dict[str, dict[str, int]]:
    grouped = records.groupby("dx")
    images, lesions = grouped.size(), grouped["lesion_id"].nunique()
    return {c: {"images": int(images.get(c, 0)), "lesions": int(lesions.get(c, 0))} for c in CLASSES}


def _per_split(records: pd.DataFrame) -> dict[str, dict[str, int]] | None:
    if records["split"].isna().any():
        return None
    counts = records.groupby(["split", "dx"]).size()
    return {s: {c: int(counts.get((s, c), 0)) for c in CLASSES} for s in SPLITS if s in counts.index}


def format_summary(summary: dict, bad_list: Path | None = None) -> str:
    """The summary as a table: one row per class, then the problems."""
    splits = summary["per_split"] or {}
    header = ["class", "images", "lesions", *splits]
    rows = [[c, v["images"], v["lesions"], *(splits[s][c] for s in splits)] for c, v in summary["per_class"].items()]
    rows.append(["total", *(sum(r[i] for r in rows) for i in range(1, len(header)))])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = [
        f"dataset {summary['root']}: {summary['images_usable']:,} usable of {summary['images_listed']:,} listed images",
        *(
            "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths)))
            for row in [header, *rows]
        ),
    ]
    if summary["problems"]:
        lines.append(f"problems found ({len(summary['problems'])}):")
        lines += [
            f"  [{p['dataset']}] {p['problem']}" + (f": {p['count']:,}" if p["count"] is not None else "")
            for p in summary["problems"]
        ]
        if bad_list is not None:
            lines.append(f"unusable images are listed in {bad_list}")
    else:
        lines.append("no problems found")
    return "\n".join(lines)


def _exit_on_problems(summary: dict, cfg: DictConfig) -> None:
    """Exit status 1 when problems were found; in a multirun the other datasets of the sweep are still checked."""
    if not summary["problems"]:
        return
    if cli.is_multirun():
        cli.record_failed_job(HydraConfig.get().runtime.output_dir, f"{len(summary['problems'])} data problem(s) found")
        return
    raise SystemExit(EXIT_PROBLEMS)


main = cli.hydra_command(check_data, "check", _exit_on_problems)

if __name__ == "__main__":
    main()
