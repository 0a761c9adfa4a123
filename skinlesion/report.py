"""The comparison report of a sweep: one ranked table over every run in a folder, and its plots.

    python -m skinlesion.report outputs/train/multiruns/<sweep> [--rank-by test/balanced_acc]
    python -m skinlesion.report <sweep> <another sweep> ... --output-dir outputs/compare   # one table

A training sweep writes its report when it ends (:class:`skinlesion.reporting.callback.MultirunReport`);
this command writes it again, for a sweep whose launcher died or with another ranking. The report itself
is built in :mod:`skinlesion.reporting`; this module is the command line only.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from skinlesion import cli
from skinlesion.errors import SkinLesionError
from skinlesion.reporting.markdown import summary_markdown
from skinlesion.reporting.rank import DEFAULT_RANK_BY
from skinlesion.reporting.write import SUMMARY_MD, write_report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m skinlesion.report",
        description="Rank every training run of one or more folders (sweeps); write summary.csv, summary.md, plots.",
    )
    parser.add_argument(
        "folders",
        type=Path,
        nargs="+",
        help="folders of runs, e.g. outputs/train/multiruns/<sweep>; several (with --output-dir) make one table",
    )
    parser.add_argument(
        "--rank-by",
        default=DEFAULT_RANK_BY,
        help="a metric column, optionally with the split to report: balanced_acc (default), test/f1_macro, ...",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where to write the report (default: the folder, if only one)"
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="pair every configuration with this one (its `config` column, e.g. ablation=baseline) instead of rank 1",
    )
    args = parser.parse_args(argv)
    try:
        report = write_report(args.folders, args.rank_by, args.output_dir, args.reference)
    except SkinLesionError as err:
        cli.fail(str(err))
    print(summary_markdown(report, args.rank_by))
    print(f"report: {(args.output_dir or report.folder) / SUMMARY_MD}")


if __name__ == "__main__":
    main()
