"""Writing a sweep's report: ``runs.csv``, ``summary.csv``, ``summary.md`` and the plots, in one call.

The one entry point of :mod:`skinlesion.reporting`, shared by the ``report`` command and the Hydra
callback that runs at the end of a training sweep.
"""

from __future__ import annotations

from pathlib import Path

from skinlesion.reporting.collect import collect_runs
from skinlesion.reporting.markdown import summary_markdown
from skinlesion.reporting.plots import write_plots
from skinlesion.reporting.rank import DEFAULT_RANK_BY, Report, compare_with_first, parse_rank_by, summarize

RUNS_CSV, SUMMARY_CSV, SUMMARY_MD = "runs.csv", "summary.csv", "summary.md"


def write_report(folder: Path, rank_by: str = DEFAULT_RANK_BY, out_dir: Path | None = None) -> Report:
    """Collect, summarise and write ``runs.csv``, ``summary.csv``, ``summary.md`` and the plots."""
    prefer, _ = parse_rank_by(rank_by)
    folder = Path(folder).expanduser().resolve()
    out_dir = Path(out_dir) if out_dir else folder
    runs = collect_runs(folder, prefer)
    summary = compare_with_first(summarize(runs, rank_by), runs, parse_rank_by(rank_by)[1])
    report = Report(runs=runs, summary=summary, folder=folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs.drop(columns=["run_dir", "overrides"]).to_csv(out_dir / RUNS_CSV, index=False)
    report.summary.to_csv(out_dir / SUMMARY_CSV, index=False)
    write_plots(report, out_dir)
    (out_dir / SUMMARY_MD).write_text(summary_markdown(report, rank_by))
    return report
