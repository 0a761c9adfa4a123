"""Tiny fits through ``skinlesion.train.train`` (MobileNetV2, 32 px, two epochs, stage 2 from epoch 1).

One deterministic run is shared by the artifact tests; a second run with the same seed must reproduce
its metrics exactly, and a copy of its folder is resumed with ``ckpt_path=last``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from skinlesion.callbacks.history import TrainingHistory
from skinlesion.cli import user_error
from skinlesion.errors import CheckpointError, ConfigError
from skinlesion.labels import CLASSES
from skinlesion.runfolder.checkpoints import load_classifier
from skinlesion.runfolder.summary import RunSummary
from skinlesion.train import _best_epoch, train

from conftest import ONE_EPOCH, compose_config, tiny_train_overrides

DETERMINISTIC = ["seed=3", "trainer.deterministic=true"]
HEADLINE = ("acc", "top3_acc", "balanced_acc", "f1_macro", "auroc_macro", "loss")


def config(root: Path, synthetic_root: Path, cache_dir: Path, *overrides: str):
    return compose_config("train", tiny_train_overrides(root, synthetic_root, cache_dir) + list(overrides))


@pytest.fixture(scope="module")
def tiny_run(
    tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path, cache_dir: Path
) -> tuple[RunSummary, Path]:
    root = tmp_path_factory.mktemp("tiny-run")
    return train(config(root, synthetic_root, cache_dir, *DETERMINISTIC)), root / "run"


def test_metrics_json_holds_best_and_final_metrics(tiny_run: tuple[RunSummary, Path]) -> None:
    summary, run = tiny_run
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["status"] == "completed" and saved["metrics"] == pytest.approx(summary.metrics)
    for split in ("val", "test"):
        for name in HEADLINE:
            assert f"{split}/{name}" in saved["metrics"]
        for name in ("acc", "balanced_acc", "f1_macro", *(f"recall_{c}" for c in CLASSES)):  # 95% intervals
            low, high = (saved["metrics"][f"{split}/{name}_ci_{end}"] for end in ("low", "high"))
            assert 0.0 <= low <= high <= 1.0
            assert high > low or name.startswith("recall_")  # a recall of 1.0 in every resample is possible
        for cls in CLASSES:
            assert 0.0 <= saved["metrics"][f"{split}/recall_{cls}"] <= 1.0
            assert 0.0 <= saved["metrics"][f"{split}/precision_{cls}"] <= 1.0

    history = pd.read_csv(run / "history.csv")
    assert saved["epochs"] == 2 and saved["last_epoch"]["epoch"] == 1  # the final epoch's train/val metrics
    assert saved["last_epoch"]["val/balanced_acc"] == pytest.approx(history["val/balanced_acc"].iloc[-1])
    best = history["val/balanced_acc"].idxmax()  # checkpoints are chosen on val/balanced_acc
    assert saved["monitor"] == "val/balanced_acc"
    assert saved["best_epoch"] == history["epoch"][best]
    assert saved["best_score"] == pytest.approx(history["val/balanced_acc"][best])
    assert saved["metrics"]["val/balanced_acc"] == pytest.approx(saved["best_score"], abs=1e-6)

    model = load_classifier(saved["best_checkpoint"]).backbone
    last_block = ("conv_head", "bn2", "classifier")  # finetune.num_blocks=1 (the head conv), plus the head
    trainable = sum(sum(p.numel() for p in model.get_submodule(m).parameters()) for m in last_block)
    assert saved["params_total"] == sum(p.numel() for p in model.parameters())
    assert saved["params_trainable"] == trainable == history["trainable_params"].iloc[-1]
    assert history["trainable_params"].iloc[0] == 1280 * 7 + 7  # stage 1: the head alone
    stages = saved["finetune"]  # what each stage trained, as the sweep report shows it
    assert stages["rule"] == "num_blocks=1" and stages["stage1_trainable_params"] == 1280 * 7 + 7
    assert stages["stage2_trainable_params"] == trainable and stages["stage2_blocks"] == 1
    share = (trainable - 1280 * 7 - 7) / stages["backbone_params"]
    assert stages["stage2_backbone_share"] == pytest.approx(share, abs=1e-4)
    assert list(history["trainable_backbone_share"]) == [0.0, pytest.approx(share, abs=1e-4)]
    assert saved["weights"] == "random (from scratch)"
    assert saved["train_time_s"] == pytest.approx(history["epoch_time_s"].sum(), abs=0.02)
    assert saved["train_images_per_s"] > 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    resolved = (run / "config.yaml").read_text()  # the run folder holds the config it ran with, resolved
    assert "${" not in resolved and "mobilenetv2_100" in resolved


def test_confusion_matrix_and_classification_report_are_consistent(tiny_run: tuple[RunSummary, Path]) -> None:
    summary, run = tiny_run
    splits = pd.read_csv(run / "split.csv")["split"].value_counts()
    for split in ("val", "test"):
        counts = pd.read_csv(run / f"confusion_matrix_{split}.csv", index_col=0)
        assert list(counts.index) == list(CLASSES) and list(counts.columns) == list(CLASSES)
        assert counts.to_numpy().sum() == splits[split]
        assert (run / f"confusion_matrix_{split}.png").stat().st_size > 0
        report = pd.read_csv(run / f"classification_report_{split}.csv", index_col=0)
        per_class = report.loc[list(CLASSES)]
        diagonal = pd.Series(counts.to_numpy().diagonal(), index=CLASSES)
        assert per_class["recall"].to_numpy() == pytest.approx((diagonal / counts.sum(axis=1)).to_numpy())
        assert per_class["support"].to_numpy() == pytest.approx(counts.sum(axis=1).to_numpy())
        metrics = summary.metrics
        assert metrics[f"{split}/balanced_acc"] == pytest.approx(per_class["recall"].mean(), abs=1e-6)
        assert metrics[f"{split}/acc"] == pytest.approx(diagonal.sum() / splits[split], abs=1e-6)
        for cls in CLASSES:
            assert metrics[f"{split}/recall_{cls}"] == pytest.approx(per_class.loc[cls, "recall"], abs=1e-6)
        assert json.loads((run / f"classification_report_{split}.json").read_text())["macro avg"]["recall"] == (
            pytest.approx(per_class["recall"].mean())
        )
        assert "macro avg" in (run / f"classification_report_{split}.txt").read_text()


def test_history_and_training_curves(tiny_run: tuple[RunSummary, Path]) -> None:
    _, run = tiny_run
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [0, 1]
    for column in ("train/loss", "val/loss", "train/balanced_acc", "val/balanced_acc", "lr/head", "lr/backbone"):
        assert history[column].notna().all(), column
    assert history["trainable_params"].is_monotonic_increasing and history["trainable_params"].nunique() == 2
    assert (history["lr/backbone"] < history["lr/head"]).all()
    assert (run / "training_curves.png").stat().st_size > 0


def test_same_seed_gives_identical_metrics(
    tiny_run: tuple[RunSummary, Path], tmp_path: Path, synthetic_root: Path, cache_dir: Path
) -> None:
    first, first_run = tiny_run
    # TensorBoard as well: a logger must not change the numbers, and its event files must be written.
    second = train(config(tmp_path, synthetic_root, cache_dir, *DETERMINISTIC, "logger=tensorboard"))
    assert second.metrics == first.metrics
    columns = [c for c in pd.read_csv(first_run / "history.csv").columns if c.startswith(("train/", "val/", "lr/"))]
    pd.testing.assert_frame_equal(
        pd.read_csv(first_run / "history.csv")[columns], pd.read_csv(tmp_path / "run" / "history.csv")[columns]
    )
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "logs" / "metrics.csv").is_file()


def test_resume_from_last_continues_in_its_own_folder(
    tiny_run: tuple[RunSummary, Path], tmp_path: Path, synthetic_root: Path, cache_dir: Path
) -> None:
    first, first_run = tiny_run
    run = tmp_path / "run"
    shutil.copytree(first_run, run)
    resumed = train(
        config(tmp_path, synthetic_root, cache_dir, *DETERMINISTIC, "ckpt_path=last", "trainer.max_epochs=3")
    )
    assert resumed.run_dir == str(run) and resumed.epochs == 3
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2]
    assert history["trainable_params"].iloc[2] == history["trainable_params"].iloc[1]  # still stage 2
    assert resumed.train_time_s > first.train_time_s
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2


def test_a_refused_resume_leaves_the_run_folder_as_it_was(
    tiny_run: tuple[RunSummary, Path], tmp_path: Path, synthetic_root: Path, cache_dir: Path
) -> None:
    """best.ckpt holds weights only: resuming from it is refused before the folder is touched."""
    _, first_run = tiny_run
    run = tmp_path / "run"
    shutil.copytree(first_run, run)
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.json")}
    cfg = config(tmp_path, synthetic_root, cache_dir, f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}")
    with pytest.raises(CheckpointError, match=r"holds weights only.*last\.ckpt"):
        train(cfg)
    assert {name: (run / name).read_bytes() for name in before} == before


# ---- settings that cannot work stop before training, with a one-line message ----------------------------
def fails_early(cfg, error: type[Exception], pattern: str, run: Path) -> None:
    with pytest.raises(Exception) as info:
        train(cfg)
    problem = user_error(info.value)
    assert isinstance(problem, error), repr(info.value)
    assert re.search(pattern, str(problem)) and "\n" not in str(problem)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["status"] == "failed" and re.search(pattern, saved["error"])
    assert not (run / "split.csv").exists()  # stopped before the data was even split
    assert not list(run.glob("checkpoints/*.ckpt"))


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["model=inception_v3", "data.image_size=64"], r"image size 64 is too small for inception_v3"),
        (["finetune.unfreeze_at_epoch=2"], r"unfreeze_at_epoch=2 is at or past trainer\.max_epochs=2"),
        (["finetune.num_blocks=20"], r"num_blocks=20 but mobilenetv2 has 19 blocks"),
    ],
)
def test_bad_settings_stop_early(
    tmp_path: Path, synthetic_root: Path, cache_dir: Path, overrides: list[str], pattern: str
) -> None:
    fails_early(config(tmp_path, synthetic_root, cache_dir, *overrides), ConfigError, pattern, tmp_path / "run")


def test_checkpoint_of_another_backbone_is_refused(
    tiny_run: tuple[RunSummary, Path], tmp_path: Path, synthetic_root: Path, cache_dir: Path
) -> None:
    _, first_run = tiny_run
    checkpoint = first_run / "checkpoints" / "last.ckpt"
    cfg = config(tmp_path, synthetic_root, cache_dir, "model=efficientnet_b0", f"ckpt_path={checkpoint}")
    fails_early(cfg, CheckpointError, r"trained with backbone mobilenetv2, but model=efficientnet_b0", tmp_path / "run")


def test_corrupt_checkpoint_is_refused(tmp_path: Path, synthetic_root: Path, cache_dir: Path) -> None:
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"PK\x03\x04 not really a zip")
    cfg = config(tmp_path, synthetic_root, cache_dir, f"ckpt_path={checkpoint}")
    fails_early(cfg, CheckpointError, r"last\.ckpt: cannot be read as a checkpoint.*corrupt", tmp_path / "run")


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed")
def test_mlflow_logger_without_mlflow_says_what_to_install(
    tmp_path: Path, synthetic_root: Path, cache_dir: Path
) -> None:
    cfg = config(tmp_path, synthetic_root, cache_dir, "logger=mlflow")
    assert cfg.logger.mlflow.tracking_uri == f"sqlite:///{tmp_path}/outputs/mlflow.db"
    fails_early(cfg, ConfigError, r"logger\.mlflow .*needs a package that is not installed.*mlflow", tmp_path / "run")


@pytest.mark.slow
def test_default_image_size_comes_from_the_backbone(tmp_path: Path, synthetic_root: Path, cache_dir: Path) -> None:
    """data.image_size=null (the default): timm's 224 px for MobileNetV2, in the model and the data alike."""
    cfg = config(tmp_path, synthetic_root, cache_dir, "data.image_size=null", *ONE_EPOCH)
    summary = train(cfg)
    assert summary.image_size == 224
    checkpoint = torch.load(summary.best_checkpoint, map_location="cpu", weights_only=True)
    assert checkpoint["datamodule_hyper_parameters"]["image_size"] == 224


def test_best_epoch_is_the_first_of_tied_scores() -> None:
    history = TrainingHistory("unused")
    history.rows = [{"epoch": e, "val/balanced_acc": s} for e, s in enumerate([0.5, 0.7, 0.7, 0.6])]
    assert _best_epoch(history, "val/balanced_acc", "max") == 1
    history.rows = [{"epoch": e, "val/loss": s} for e, s in enumerate([0.9, 0.4, 0.4])]
    assert _best_epoch(history, "val/loss", "min") == 1


def test_history_leaves_val_columns_empty_in_epochs_without_validation(
    tmp_path: Path, synthetic_root: Path, cache_dir: Path
) -> None:
    cfg = config(
        tmp_path, synthetic_root, cache_dir, *ONE_EPOCH, "trainer.max_epochs=2", "+trainer.check_val_every_n_epoch=2"
    )
    summary = train(cfg)
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["val/balanced_acc"].isna().tolist() == [True, False]
    assert summary.best_epoch == 1
