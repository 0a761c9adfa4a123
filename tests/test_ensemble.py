"""An ensemble averages its members' probabilities exactly, each member with its own preprocessing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from skinlesion.errors import ConfigError
from skinlesion.evaluate import evaluate
from skinlesion.inference import split as split_module
from skinlesion.inference.ensemble import ensemble_checkpoints, member_names
from skinlesion.inference.predictions import SplitPredictions
from skinlesion.labels import CLASSES
from skinlesion.runfolder.summary import COMPLETED, FAILED, TRAIN, RunSummary

from conftest import compose_config, run_cli

PROBS = [f"prob_{c}" for c in CLASSES]


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory, trained_run: Path) -> tuple[Path, Path]:
    """Two different checkpoints: a tiny trained run, and a copy with other weights that reads 40 px images."""
    root = tmp_path_factory.mktemp("ensemble")
    first = trained_run / "checkpoints" / "best.ckpt"

    checkpoint = torch.load(first, map_location="cpu", weights_only=False)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in checkpoint["state_dict"].items():
        if tensor.is_floating_point() and "backbone" in name:
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    hparams = checkpoint["hyper_parameters"]
    hparams["image_size"] = hparams["preprocessing"]["image_size"] = 40
    second = root / "other" / "checkpoints" / "best.ckpt"
    second.parent.mkdir(parents=True)
    torch.save(checkpoint, second)
    return first, second


def run_evaluate(out: Path, *overrides: str) -> RunSummary:
    return evaluate(
        compose_config(
            "evaluate", [f"paths.root_dir={out}", f"paths.output_dir={out}", "clinical.figures=false", *overrides]
        )
    )


def test_ensemble_averages_the_members_exactly(members: tuple[Path, Path], tmp_path: Path) -> None:
    first, second = members
    result = run_evaluate(tmp_path / "ensemble", f"ensemble=[{first},{second}]")
    out = tmp_path / "ensemble"
    names = member_names([first, second])
    assert names == ["run", "other"]
    ensemble = pd.read_csv(out / "predictions_test.csv")
    parts = [pd.read_csv(out / "members" / name / "predictions_test.csv") for name in names]
    for part in parts:
        assert list(part["image_id"]) == list(ensemble["image_id"])
        assert list(part["true"]) == list(ensemble["true"])
    expected = (parts[0][PROBS].to_numpy() + parts[1][PROBS].to_numpy()) / 2
    np.testing.assert_allclose(ensemble[PROBS].to_numpy(), expected, atol=1e-6)
    assert not np.allclose(parts[0][PROBS].to_numpy(), parts[1][PROBS].to_numpy(), atol=1e-3)

    # Each member is scored as on its own, through its own preprocessing (40 px for the second).
    alone = run_evaluate(tmp_path / "alone", f"ckpt_path={second}")
    np.testing.assert_allclose(
        pd.read_csv(tmp_path / "alone" / "predictions_test.csv")[PROBS].to_numpy(),
        parts[1][PROBS].to_numpy(),
        atol=1e-6,
    )
    assert result.members["other"]["image_size"] == 40
    member = result.members["other"]["metrics"]  # alone, it also has the clinical evaluation, which members lack
    assert member == pytest.approx({k: alone.metrics[k] for k in member})
    assert result.ensemble is True
    table = pd.read_csv(out / "models_test.csv")
    assert list(table["model"]) == ["ensemble", *names]
    assert table.loc[0, "balanced_acc"] == pytest.approx(result.metrics["test/balanced_acc"])
    for i in range(1, len(names) + 1):  # the ensemble's gain over each member, on the same images
        gain = table.loc[i, "ensemble_gain_difference"]
        assert gain == pytest.approx(table.loc[0, "balanced_acc"] - table.loc[i, "balanced_acc"], abs=1e-6)
        assert table.loc[i, "ensemble_gain_low"] <= gain <= table.loc[i, "ensemble_gain_high"]
    assert table.loc[0, ["ensemble_gain_difference", "ensemble_gain_low"]].isna().all()
    assert json.loads((out / "metrics.json").read_text())["metrics"] == pytest.approx(result.metrics)


def test_ensemble_of_a_multirun_folder_uses_every_completed_run(members: tuple[Path, Path], tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    for i, checkpoint in enumerate(members):
        run = sweep / f"{i}_mobilenetv2_seed{i}"
        (run / "checkpoints").mkdir(parents=True)
        shutil.copy(checkpoint, run / "checkpoints" / "best.ckpt")
        RunSummary(TRAIN, COMPLETED, str(run), backbone="mobilenetv2", seed=i).write()
    RunSummary(TRAIN, FAILED, str(sweep / "2_inception_v3_seed0"), error="ConfigError: ...").write()
    assert [p.parent.parent.name for p in ensemble_checkpoints(str(sweep))] == [
        "0_mobilenetv2_seed0",
        "1_mobilenetv2_seed1",
    ]
    best_checkpoint = sweep / "0_mobilenetv2_seed0" / "checkpoints" / "best.ckpt"
    assert ensemble_checkpoints([str(sweep / "0_mobilenetv2_seed0")]) == [best_checkpoint]
    assert ensemble_checkpoints(str(sweep / "0_mobilenetv2_seed0")) == [best_checkpoint]  # one run folder, alone
    assert len(ensemble_checkpoints([str(sweep), str(best_checkpoint)])) == 3  # a sweep inside a list
    # A member called "ensemble" must not take the averaged model's place.
    assert "ensemble" not in member_names([sweep / "ensemble" / "checkpoints" / "best.ckpt", best_checkpoint])

    result = run_evaluate(tmp_path / "out", f"ensemble={sweep}", "split=val", "tta=true", "tta_views=2")
    assert sorted(result.members) == ["0_mobilenetv2_seed0", "1_mobilenetv2_seed1"]
    assert result.tta_views == 2 and "val/balanced_acc" in result.metrics

    with pytest.raises(ConfigError, match="no completed run"):
        ensemble_checkpoints(str(sweep / "2_inception_v3_seed0"))


def test_members_trained_on_different_splits_are_refused(members: tuple[Path, Path], tmp_path: Path) -> None:
    first, _ = members
    checkpoint = torch.load(first, map_location="cpu", weights_only=False)
    checkpoint["datamodule_hyper_parameters"]["split"]["seed"] = 7
    other = tmp_path / "other-split.ckpt"
    torch.save(checkpoint, other)
    with pytest.raises(ConfigError, match="different splits"):
        run_evaluate(tmp_path, f"ensemble=[{first},{other}]")
    with pytest.raises(ConfigError, match="either ckpt_path"):
        run_evaluate(tmp_path, f"ckpt_path={first}", f"ensemble=[{first}]")


@pytest.mark.parametrize("method", ["greedy", pytest.param("stacking", marks=pytest.mark.slow)])
def test_selection_is_fitted_on_validation_and_never_sees_the_scored_labels(
    members: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    first, second = members
    args = [f"ensemble=[{first},{second}]", f"ensemble_method={method}"]
    clean = run_evaluate(tmp_path / "clean", *args)
    selection = clean.ensemble_selection
    assert selection["method"] == method and selection["selected_on"] == "val" and "note" not in selection
    val_images = len(pd.read_csv(first.parent.parent / "predictions_val.csv"))
    assert selection["selection_images"] == val_images
    if method == "greedy":  # the validation weights, applied to the test members' probabilities
        assert sum(selection["weights"].values()) == pytest.approx(1.0)
        out = tmp_path / "clean"
        ensemble = pd.read_csv(out / "predictions_test.csv")[PROBS].to_numpy()
        weighted = sum(
            weight * pd.read_csv(out / "members" / name / "predictions_test.csv")[PROBS].to_numpy()
            for name, weight in selection["weights"].items()
        )
        np.testing.assert_allclose(ensemble, weighted, atol=1e-6)

    real = split_module.predict_split

    def with_wrong_test_labels(model, datamodule, split: str, *rest) -> SplitPredictions:
        result = real(model, datamodule, split, *rest)
        if split != "test":
            return result
        return SplitPredictions(result.probs, (result.labels + 1) % len(CLASSES), result.indices)

    monkeypatch.setattr(split_module, "predict_split", with_wrong_test_labels)
    poisoned = run_evaluate(tmp_path / "poisoned", *args)
    assert poisoned.ensemble_selection == selection
    before, after = (pd.read_csv(tmp_path / name / "predictions_test.csv") for name in ("clean", "poisoned"))
    assert (before["true"] != after["true"]).all()  # the poison reached the scored split ...
    np.testing.assert_array_equal(after[PROBS].to_numpy(), before[PROBS].to_numpy())  # ... and changed nothing


def test_selection_scored_on_its_own_validation_split_says_it_is_optimistic(
    members: tuple[Path, Path], tmp_path: Path
) -> None:
    first, second = members
    result = run_evaluate(tmp_path, f"ensemble=[{first},{second}]", "ensemble_method=greedy", "split=val")
    assert "optimistic" in result.ensemble_selection["note"]
    assert result.ensemble_selection["selection_images"] == result.images
    with pytest.raises(ConfigError, match="ensemble_method=greedy combines the members"):
        run_evaluate(tmp_path, f"ckpt_path={first}", "ensemble_method=greedy")


@pytest.mark.slow  # the README test runs the same command
def test_evaluate_command_with_greedy_selection_records_members_and_weights(
    members: tuple[Path, Path], tmp_path: Path
) -> None:
    first, second = members
    args = [f"ensemble=[{first},{second}]", "ensemble_method=greedy", "clinical.figures=false", "device=cpu"]
    result = run_cli(tmp_path, "skinlesion.evaluate", *args, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (metrics,) = (tmp_path / "outputs" / "evaluate" / "runs").glob("*/metrics.json")
    selection = json.loads(metrics.read_text())["ensemble_selection"]
    assert selection["method"] == "greedy" and set(selection["weights"]) <= {"run", "other"}
    assert sum(selection["weights"].values()) == pytest.approx(1.0) and len(selection["path"]) == 20
    assert "ensemble_method=greedy, chosen on the validation split" in result.stderr + result.stdout
