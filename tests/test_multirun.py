"""`train -m` over the five backbones ends in a comparison report; a failed job is reported, not fatal."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from skinlesion.labels import CLASSES

from conftest import ONE_EPOCH, USER_TINY, compose_config, only_sweep, run_cli, run_user, sweep_overrides

BACKBONES = ("resnet50", "densenet121", "mobilenetv2", "efficientnet_b0", "inception_v3")


@pytest.fixture(scope="module")
def five_backbone_sweep(
    tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path, cache_dir: Path
) -> tuple[subprocess.CompletedProcess, Path]:
    home = tmp_path_factory.mktemp("sweep")
    # The default stage 2 (finetune.share), reached in a second epoch, so every run records what it trained.
    stage2 = ["trainer.max_epochs=2", "finetune.unfreeze_at_epoch=1", "finetune.num_blocks=null"]
    args = [*sweep_overrides(home, synthetic_root, cache_dir), *ONE_EPOCH, "data.image_size=75", *stage2]
    result = run_cli(home, "skinlesion.train", "-m", f"model={','.join(BACKBONES)}", *args)
    return result, only_sweep(home)


@pytest.mark.slow
def test_sweep_over_the_five_backbones_reports_every_run(five_backbone_sweep) -> None:
    result, sweep = five_backbone_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert [p.name for p in runs] == [f"{i}_{name}_seed0" for i, name in enumerate(BACKBONES)]

    summary = pd.read_csv(sweep / "summary.csv").set_index("backbone")
    table = pd.read_csv(sweep / "runs.csv").set_index("run")
    assert sorted(summary.index) == sorted(BACKBONES) and len(table) == 5
    for run in runs:
        saved = json.loads((run / "metrics.json").read_text())
        assert saved["status"] == "completed"
        row, line = summary.loc[saved["backbone"]], table.loc[run.name]
        assert row["runs"] == 1 and row["split"] == "test" and row["image_size"] == 75
        assert row["params_m"] == pytest.approx(saved["params_total"] / 1e6)
        assert row["epochs"] == saved["epochs"] == 2
        stages = saved["finetune"]
        assert stages["rule"] == "share=0.7" and row["stage2_share"] == pytest.approx(stages["stage2_backbone_share"])
        assert row["stage2_params_m"] == pytest.approx(stages["stage2_backbone_params"] / 1e6)
        history = pd.read_csv(run / "history.csv")
        assert list(history["trainable_backbone_share"]) == [0.0, pytest.approx(stages["stage2_backbone_share"])]
        assert row["train_time_s"] == pytest.approx(saved["train_time_s"])
        assert row["train_images_per_s"] == pytest.approx(saved["train_images_per_s"])
        for metric in ("acc", "top3_acc", "balanced_acc", "f1_macro", "auroc_macro", *(f"recall_{c}" for c in CLASSES)):
            assert row[metric] == pytest.approx(saved["metrics"][f"test/{metric}"]), metric
            assert line[metric] == pytest.approx(saved["metrics"][f"test/{metric}"]), metric
    assert summary["stage2_share"].max() - summary["stage2_share"].min() <= 0.05  # a fair comparison
    ranked = summary.sort_values("rank")
    assert list(ranked["rank"]) == [1, 2, 3, 4, 5]
    assert list(ranked["balanced_acc"]) == sorted(summary["balanced_acc"], reverse=True)

    markdown = (sweep / "summary.md").read_text()
    assert all(f"| {name} |" in markdown for name in BACKBONES)
    assert "stage-2 share" in markdown and "Stage 2 trained 68.4% to 72.2% of each backbone's parameters" in markdown
    for plot in ("summary_metrics.png", "summary_confusion.png", "summary_roc.png"):
        assert (sweep / plot).stat().st_size > 10_000, plot


@pytest.mark.slow
def test_a_failed_job_is_reported_and_the_sweep_exits_non_zero(
    tmp_path: Path, synthetic_root: Path, cache_dir: Path
) -> None:
    # InceptionV3 needs 75 px: at 32 px its job fails at once, while MobileNetV2's completes.
    args = [*sweep_overrides(tmp_path, synthetic_root, cache_dir), *ONE_EPOCH]
    result = run_cli(tmp_path, "skinlesion.train", "-m", "model=mobilenetv2,inception_v3", *args)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: 1 job(s) of the multirun failed (listed above)"
    sweep = only_sweep(tmp_path)

    failed = json.loads((sweep / "1_inception_v3_seed0" / "metrics.json").read_text())
    assert failed["status"] == "failed"
    assert failed["error"].startswith("ConfigError: image size 32 is too small for inception_v3")
    assert json.loads((sweep / "0_mobilenetv2_seed0" / "metrics.json").read_text())["status"] == "completed"

    summary = pd.read_csv(sweep / "summary.csv").set_index("backbone")
    assert summary.loc["mobilenetv2", "status"] == "completed" and summary.loc["mobilenetv2", "rank"] == 1
    assert summary.loc["inception_v3", "status"] == "failed"
    assert summary.loc["inception_v3", "error"] == failed["error"]
    markdown = (sweep / "summary.md").read_text()
    assert "## Failed runs" in markdown and "too small for inception_v3" in markdown


@pytest.mark.parametrize("seed", [0, 2])
def test_experiments_hold_complete_recipes_and_seeds_share_the_split(seed: int, tmp_path: Path) -> None:
    paper = compose_config("train", ["experiment=paper", f"seed={seed}", f"paths.root_dir={tmp_path}"])
    assert paper.model.name == "resnet50" and paper.optimizer._target_ == "torch.optim.Adam"
    assert paper.seed == seed and paper.data.split.seed == 42  # the split seed never follows the training seed
    assert (paper.data.split.strategy, paper.data.split.val, paper.data.split.test) == ("image_stratified", 0.2, 0)
    assert paper.data.class_weights == "balanced" and paper.finetune.unfreeze_at_epoch > 0
    assert paper.data.augment.rotate and paper.data.augment.zoom and paper.data.augment.hflip

    benchmark = compose_config(
        "train", ["experiment=benchmark", "model=inception_v3", f"seed={seed}", f"paths.root_dir={tmp_path}"]
    )
    assert benchmark.model.name == "inception_v3"  # the sweep's backbone wins over the recipe's
    assert benchmark.seed == seed and benchmark.data.split.seed == 42
    assert (benchmark.data.split.strategy, benchmark.data.split.test) == ("lesion_grouped", 0.15)
    assert benchmark.optimizer._target_ == "torch.optim.AdamW" and "WarmupCosine" in benchmark.scheduler._target_
    assert benchmark.monitor == "val/balanced_acc"


@pytest.mark.slow
@pytest.mark.parametrize(
    "home_set",
    [
        pytest.param(False, id="from-the-working-folder"),
        pytest.param(True, id="SKINLESION_HOME", marks=pytest.mark.slow),
    ],
)
def test_a_plain_sweep_starts_from_an_empty_folder_and_writes_its_report(tmp_path: Path, home_set: bool) -> None:
    """As a user types it: no paths.* override, no environment variable (or $SKINLESION_HOME elsewhere)."""
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    tiny = [o for o in USER_TINY if not o.startswith(("trainer.max_epochs", "finetune."))]
    result = run_user(
        cwd, "python", "-m", "skinlesion.train", "-m", "model=mobilenetv2,efficientnet_b0", *tiny,
        "trainer.max_epochs=1", home=home if home_set else None,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = ((home if home_set else cwd) / "outputs" / "train" / "multiruns").iterdir()
    summary = pd.read_csv(sweep / "summary.csv")
    assert sorted(summary["backbone"]) == ["efficientnet_b0", "mobilenetv2"]
    assert (sweep / "summary.md").is_file()
    assert sorted(p.name for p in cwd.iterdir()) == ([] if home_set else ["data", "outputs"])
