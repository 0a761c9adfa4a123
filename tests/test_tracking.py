"""Issue 16: what the loggers receive (one shared tiny run with MLflow, TensorBoard and W&B), the config tree."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from skinlesion.runfolder.config_tree import CONFIG_TREE_FILE, show_config_tree
from skinlesion.runfolder.summary import RunSummary
from skinlesion.tracking import HP_METRIC, flat_config
from skinlesion.train import train

from conftest import ONE_EPOCH, compose_config, tiny_train_overrides

HAS_WANDB = importlib.util.find_spec("wandb") is not None


@pytest.fixture(scope="module")
def tracked_run(
    tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path, cache_dir: Path, monkeypatch_module
) -> tuple[RunSummary, Path]:
    """One tiny run logged to every logger at once (W&B offline, when installed)."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    root = tmp_path_factory.mktemp("tracked")
    loggers = ["mlflow", "tensorboard", *(["wandb"] if HAS_WANDB else [])]
    overrides = [*tiny_train_overrides(root, synthetic_root, cache_dir), *ONE_EPOCH, f"logger=[{','.join(loggers)}]"]
    monkeypatch_module.setenv("WANDB_SILENT", "true")
    monkeypatch_module.setenv("WANDB_DIR", str(root))  # W&B's own settings and cache stay in the test's folder
    return train(compose_config("train", overrides)), root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _mlflow_run(root: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/outputs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("skinlesion").experiment_id])
    return client, run


def _tensorboard_scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    events = EventMultiplexer().AddRunsFromDirectory(str(run_dir / "tensorboard"))
    events.Reload()
    scalars: dict[str, list[float]] = {}
    for name in events.Runs():
        accumulator = events.GetAccumulator(name)
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return scalars


def test_mlflow_run_holds_the_flattened_config_final_metrics_and_artifacts(
    tracked_run: tuple[RunSummary, Path],
) -> None:
    summary, root = tracked_run
    client, run = _mlflow_run(root)
    params = run.data.params
    assert params["seed"] == "0"
    assert params["optimizer.lr"] == "0.001" and params["finetune.backbone_lr"] == "0.0001"
    assert params["finetune.unfreeze_at_epoch"] == "None" and params["finetune.bn"] == "frozen_eval"
    assert params["trainer.max_epochs"] == "1" and params["data.class_weights"] == "balanced"
    assert params["monitor"] == "val/balanced_acc"
    metrics = run.data.metrics
    for key in ("val/balanced_acc", "test/balanced_acc", "test/balanced_acc_ci_low", "test/balanced_acc_ci_high"):
        assert metrics[f"final/{key}"] == pytest.approx(summary.metrics[key])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    expected = {"metrics.json", "config.yaml", CONFIG_TREE_FILE, "confusion_matrix_val.png", "training_curves.png"}
    assert expected | {"classification_report_test.txt", "reliability_val.png"} <= artifacts
    assert "checkpoints" not in artifacts  # tracking.log_checkpoint is off by default
    assert run.info.status == "FINISHED"


def test_tensorboard_hp_metric_equals_the_monitored_metric(tracked_run: tuple[RunSummary, Path]) -> None:
    summary, _ = tracked_run
    scalars = _tensorboard_scalars(Path(summary.run_dir))
    assert scalars[HP_METRIC][-1] == pytest.approx(summary.metrics[summary.monitor])
    assert list((Path(summary.run_dir) / "tensorboard").glob("events.out.tfevents.*"))


def test_learning_rates_are_logged_per_parameter_group(tracked_run: tuple[RunSummary, Path]) -> None:
    summary, root = tracked_run
    _, run = _mlflow_run(root)
    head, backbone = run.data.metrics["lr-Adam/head"], run.data.metrics["lr-Adam/backbone"]
    assert backbone == pytest.approx(head / 10)  # finetune.backbone_lr is a tenth of optimizer.lr here
    scalars = _tensorboard_scalars(Path(summary.run_dir))
    assert {"lr-Adam/head", "lr-Adam/backbone"} <= set(scalars)


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install -e '.[loggers]')")
def test_wandb_offline_writes_its_run_folder(tracked_run: tuple[RunSummary, Path]) -> None:
    summary, _ = tracked_run
    (folder,) = (Path(summary.run_dir) / "wandb").glob("offline-run-*")
    assert list(folder.glob("run-*.wandb"))  # the run's history, config and summary, ready for `wandb sync`


def test_flat_config_uses_the_override_names() -> None:
    assert flat_config({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}, "f": None}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "e": {},
        "f": None,
    }


def test_config_tree_is_printed_and_saved_with_the_overrides_highlighted(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = compose_config("train", ["optimizer.lr=0.003", "model=densenet121", f"paths.output_dir={tmp_path}"])
    show_config_tree(cfg, tmp_path, overrides=["optimizer.lr=0.003", "model=densenet121"])
    saved = (tmp_path / CONFIG_TREE_FILE).read_text()
    printed = capsys.readouterr().out
    for text in (saved, printed):
        assert "overrides" in text and "optimizer.lr=0.003" in text
        assert "optimizer (overridden)" in text and "model (overridden)" in text and "trainer (overridden)" not in text
        assert "lr: 0.003" in text and "densenet121" in text
