"""The search part of a report: the Optuna trials of a sweep folder (``conf/hparams_search/``) and the best one.

The study's storage (``<sweep>/optuna.db``) is the record of the search, failed and resumed trials
included; each trial is matched to its job folder by its sampled overrides, which Hydra's Optuna sweeper
passes to the job as ``key=value`` exactly as it prints them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from skinlesion.errors import ConfigError

STORAGE_FILE = "optuna.db"
TRIALS_CSV = "trials.csv"


def storage_files(folders: Sequence[Path]) -> list[Path]:
    """The Optuna storages of the given folders (a search folder holds one)."""
    return [Path(f) / STORAGE_FILE for f in folders if (Path(f) / STORAGE_FILE).is_file()]


def search_trials(storage: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per trial of every study in ``storage``: study, trial, state, value, whether it is the study's
    best, its run folder and its params."""
    try:
        import optuna
    except ModuleNotFoundError as err:
        raise ConfigError(f"{storage} is an Optuna search: pip install -e '.[search]' to report it") from err
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{storage.resolve()}"
    rows = []
    for study_summary in optuna.get_all_study_summaries(url):
        study = optuna.load_study(study_name=study_summary.study_name, storage=url)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = study.best_trial.number if done else None  # in the study's own direction
        for trial in study.trials:
            rows.append(
                {
                    "study": study.study_name,
                    "trial": trial.number,
                    "state": trial.state.name,
                    "value": trial.value,
                    "best": trial.number == best,
                    "run": _trial_run(trial.params, runs),
                    **{f"params.{k}": v for k, v in trial.params.items()},
                }
            )
    return pd.DataFrame(rows)


def _trial_run(params: dict, runs: pd.DataFrame) -> str | None:
    """The run folder whose overrides hold every sampled value of the trial (the sweeper's own formatting)."""
    wanted = {f"{k}={v}" for k, v in params.items()}
    matches = [row["run"] for _, row in runs.iterrows() if wanted <= set(row["overrides"])]
    return matches[0] if len(matches) == 1 else None
