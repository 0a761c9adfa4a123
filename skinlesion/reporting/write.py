"""Writing a sweep's report: ``runs.csv``, ``summary.csv``, ``summary.md`` and the plots, in one call.

The one entry point of :mod:`skinlesion.reporting`, shared by the ``report`` command and the Hydra
callback that runs at the end of a training sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from skinlesion.errors import ConfigError
from skinlesion.reporting.collect import collect_runs
from skinlesion.reporting.markdown import summary_markdown
from skinlesion.reporting.plots import write_plots
from skinlesion.reporting.rank import DEFAULT_RANK_BY, Report, compare_with_first, parse_rank_by, summarize
from skinlesion.reporting.search import TRIALS_CSV, search_trials, storage_files

RUNS_CSV, SUMMARY_CSV, SUMMARY_MD = "runs.csv", "summary.csv", "summary.md"


def write_report(
    folders: Path | Sequence[Path],
    rank_by: str = DEFAULT_RANK_BY,
    out_dir: Path | None = None,
    reference: str | None = None,
) -> Report:
    """Collect, summarise and write ``runs.csv``, ``summary.csv``, ``summary.md`` and the plots (and
    ``trials.csv`` for an Optuna search folder). Several folders make one table, written to ``out_dir``.
    ``reference``: the configuration every other one is paired with (default: rank 1)."""
    prefer, _ = parse_rank_by(rank_by)
    folders = [Path(f).expanduser().resolve() for f in ([folders] if isinstance(folders, str | Path) else folders)]
    folders = list(dict.fromkeys(folders))
    if len(folders) > 1 and out_dir is None:
        raise ConfigError("a report over several folders needs --output-dir (it belongs to none of them)")
    out_dir = Path(out_dir) if out_dir else folders[0]
    runs = collect_runs(folders, prefer)
    summary = compare_with_first(summarize(runs, rank_by), runs, parse_rank_by(rank_by)[1], reference)
    storages = storage_files(folders)
    trials = pd.concat([search_trials(s, runs) for s in storages], ignore_index=True) if storages else None
    folder = folders[0] if len(folders) == 1 else out_dir
    report = Report(runs=runs, summary=summary, folder=folder, trials=trials, reference=reference)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs.drop(columns=["run_dir", "overrides"]).to_csv(out_dir / RUNS_CSV, index=False)
    report.summary.to_csv(out_dir / SUMMARY_CSV, index=False)
    if trials is not None:
        trials.to_csv(out_dir / TRIALS_CSV, index=False)
    write_plots(report, out_dir)
    (out_dir / SUMMARY_MD).write_text(summary_markdown(report, rank_by))
    return report
