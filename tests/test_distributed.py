"""Beyond one process: DDP over two CPU processes (gloo), and a sweep through the submitit launcher."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from skinlesion import cli
from skinlesion.config import CONFIG_DIR
from skinlesion.data import datamodule as datamodule_module
from skinlesion.errors import ConfigError, TrainingDivergedError
from skinlesion.models.module import SkinLesionClassifier
from skinlesion.train import _check_distributed_launch

from conftest import ONE_EPOCH, only_sweep, run_cli, sweep_overrides

DDP_ON_TWO_CPUS = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "model=mobilenetv2"]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_leaves_one_run_with_the_metrics_rank_zero_logged(
    tmp_path: Path, synthetic_root: Path, cache_dir: Path
) -> None:
    # Two epochs (stage 2 from epoch 1), so the unfreeze happens under DDP; no temperature, so the
    # metrics.json numbers and the logged ones come from the same probabilities.
    # data.split.seed=1 gives 61 validation images: DistributedSampler repeats one to even out the ranks.
    args = [*sweep_overrides(tmp_path, synthetic_root, cache_dir), *DDP_ON_TWO_CPUS, "calibrate=false"]
    args.append("data.split.seed=1")
    result = run_cli(tmp_path, "skinlesion.train", *args)
    assert result.returncode == 0, result.stderr[-3000:]

    (run,) = (tmp_path / "outputs" / "train" / "runs").iterdir()  # Lightning's rank 1 ran in rank 0's folder
    assert (run / "train_ddp_process_1.log").is_file()
    assert list(tmp_path.rglob("metrics.json")) == [run / "metrics.json"]
    assert len(list((run / "checkpoints").glob("best-epoch*.ckpt"))) == 1
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["status"] == "completed" and saved["epochs"] == 2
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == [0, 1]

    split = pd.read_csv(run / "split.csv")["split"]
    assert (split == "val").sum() % 2 == 1  # the logged metrics must still count each image once
    for name in ("val", "test"):
        predictions = pd.read_csv(run / f"predictions_{name}.csv")
        assert len(predictions) == (split == name).sum() and predictions["image_id"].is_unique

    logged = pd.read_csv(run / "logs" / "metrics.csv")
    for name in ("val", "test"):
        final = logged[[c for c in logged.columns if c.startswith(f"{name}/")]].dropna(how="all").iloc[-1]
        compared = dict(final.items())
        assert len(compared) >= 18
        assert {k: saved["metrics"][k] for k in compared} == pytest.approx(compared, abs=1e-6)


@pytest.mark.slow
def test_sweep_through_the_submitit_local_launcher_is_aggregated_by_the_report(
    tmp_path: Path, synthetic_root: Path, cache_dir: Path
) -> None:
    args = [*sweep_overrides(tmp_path, synthetic_root, cache_dir), *ONE_EPOCH, "model=mobilenetv2"]
    result = run_cli(tmp_path, "skinlesion.train", "-m", "hydra/launcher=submitit_local", "seed=0,1", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = only_sweep(tmp_path)
    assert (sweep / ".submitit").is_dir()  # the jobs ran as submitit jobs, not in the Hydra process

    runs = [sweep / "0_mobilenetv2_seed0", sweep / "1_mobilenetv2_seed1"]
    saved = [json.loads((run / "metrics.json").read_text()) for run in runs]
    assert [s["status"] for s in saved] == ["completed", "completed"] and [s["seed"] for s in saved] == [0, 1]
    pd.testing.assert_frame_equal(pd.read_csv(runs[0] / "split.csv"), pd.read_csv(runs[1] / "split.csv"))

    (row,) = pd.read_csv(sweep / "summary.csv").to_dict("records")  # two seeds, one configuration
    scores = [s["metrics"]["test/balanced_acc"] for s in saved]
    assert row["runs"] == 2 and row["seeds"] == "0,1"
    assert row["balanced_acc"] == pytest.approx(statistics.mean(scores))
    assert row["balanced_acc_std"] == pytest.approx(statistics.stdev(scores))


def test_ddp_inside_a_local_multirun_is_refused_unless_the_cluster_starts_the_ranks(monkeypatch) -> None:
    # Lightning would re-run the sweep's command line for rank 1; under SLURM or torchrun the ranks exist already.
    monkeypatch.setattr(cli, "is_multirun", lambda: True)
    settings = {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "logger": False, "enable_checkpointing": False}
    with pytest.raises(ConfigError, match=r"cannot run inside a local multirun.*hydra/launcher=submitit_slurm"):
        _check_distributed_launch(L.Trainer(**settings))
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "test",
    }.items():
        monkeypatch.setenv(key, value)
    _check_distributed_launch(L.Trainer(**settings))  # torchrun started the ranks: nothing to re-run


def test_a_diverged_loss_on_another_rank_stops_this_one_too() -> None:
    """The ranks agree on the finite flag, so no rank raises while the others wait in the next collective."""
    spec = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / "mobilenetv2.yaml"))
    module = SkinLesionClassifier(model={**spec, "pretrained": False}, image_size=32)
    other_rank_diverged = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: False)
    module._trainer = SimpleNamespace(
        callback_metrics={"train/loss": torch.tensor(0.7)}, strategy=other_rank_diverged, current_epoch=3
    )
    with pytest.raises(TrainingDivergedError, match=r"NaN or infinite on another process in epoch 3"):
        module.on_train_epoch_end()
    every_rank_finite = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)
    module._trainer.strategy = every_rank_finite
    module.on_train_epoch_end()


def test_loader_workers_are_shared_among_the_processes_of_a_node(monkeypatch) -> None:
    monkeypatch.setattr(datamodule_module, "available_cpus", lambda: 12)
    datamodule = datamodule_module.SkinLesionDataModule("unused")
    assert datamodule.num_workers == 8  # one process: min(8, CPUs)
    datamodule.trainer = SimpleNamespace(num_devices=4)
    assert datamodule.num_workers == 3  # four ranks on this node share its 12 CPUs
    datamodule.hparams.num_workers = 5
    assert datamodule.num_workers == 5  # an explicit count is per process, as given
