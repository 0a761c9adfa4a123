"""Issue 16: an Optuna search over the recipe (conf/hparams_search/recipe_optuna.yaml) on tiny synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli, sweep_overrides

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[search]'")

# Two short epochs, so that the sampled unfreeze epoch (0 or 1) gives a stage 2.
SHORT = ["data.batch_size=8", *(f"+trainer.limit_{s}_batches=2" for s in ("train", "val", "test"))]


def search(home: Path, sweep: Path, data_root: Path, cache: Path, trials: int):
    args = [
        "hparams_search=recipe_optuna",
        f"hydra.sweep.dir={sweep}",
        f"hydra.sweeper.n_trials={trials}",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "search.last_unfreeze_epoch=1",
        *sweep_overrides(home, data_root, cache),
        *SHORT,
        "model=mobilenetv2",
        "print_config=false",
    ]
    result = run_cli(home, "skinlesion.train", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_optuna_search_completes_resumes_from_its_storage_and_reports_its_best_trial(
    tmp_path: Path, synthetic_root: Path, cache_dir: Path
) -> None:
    sweep = tmp_path / "search"
    search(tmp_path, sweep, synthetic_root, cache_dir, trials=3)
    assert (sweep / "optuna.db").is_file()
    first = pd.read_csv(sweep / "trials.csv")
    assert list(first["trial"]) == [0, 1, 2] and (first["state"] == "COMPLETE").all()

    search(tmp_path, sweep, synthetic_root, cache_dir, trials=1)  # the same folder: the study goes on
    trials = pd.read_csv(sweep / "trials.csv")
    assert list(trials["trial"]) == [0, 1, 2, 3]
    assert trials[trials["trial"] < 3].drop(columns="run").equals(first.drop(columns="run"))
    assert trials["run"].notna().all() and trials["run"].is_unique  # a resumed trial did not reuse a folder
    assert len(list(sweep.glob("*/metrics.json"))) == 4

    best = trials[trials["best"]].iloc[0]
    assert best["value"] == trials["value"].max()
    saved = json.loads((sweep / best["run"] / "metrics.json").read_text())
    assert saved["metrics"]["val/balanced_acc"] == pytest.approx(best["value"])
    text = (sweep / "summary.md").read_text()
    assert "## Search (Optuna)" in text and f"Best trial of mobilenetv2_recipe: #{best['trial']}," in text
