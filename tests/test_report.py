"""The comparison report over a folder of runs, built from hand-made run folders (no training)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from skinlesion import cli
from skinlesion.errors import ConfigError, DataError
from skinlesion.inference.predictions import SplitPredictions
from skinlesion.labels import CLASSES
from skinlesion.report import main
from skinlesion.reporting.callback import MultirunReport
from skinlesion.reporting.collect import NOT_FINISHED
from skinlesion.reporting.plots import error_bars
from skinlesion.reporting.rank import PAIRED
from skinlesion.reporting.write import write_report
from skinlesion.runfolder.files import find_runs, write_json
from skinlesion.runfolder.summary import COMPLETED, EVALUATE, FAILED, TRAIN, RunSummary
from skinlesion.scoring.artifacts import write_split_artifacts
from skinlesion.scoring.bootstrap import interval_method

N_IMAGES = 28


def make_run(
    sweep: Path,
    name: str,
    backbone: str,
    seed: int,
    *,
    failed: str | None = None,
    with_test: bool = True,
    extra: tuple[str, ...] = (),
    skill: float = 0.0,
    lesions_named: bool = True,
) -> dict:
    """A run folder as train() leaves it: overrides, metrics.json and the split artifacts; without
    ``lesions_named`` every image is its own lesion, as in an ISIC 2018 set without lesion groupings."""
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create([f"model={backbone}", f"seed={seed}", "trainer.max_epochs=3", *extra]),
        run / ".hydra" / "overrides.yaml",
    )
    if failed:
        summary = RunSummary(task=TRAIN, status=FAILED, run_dir=str(run), backbone=backbone, seed=seed, error=failed)
        summary.write()
        return summary.to_dict()
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    labels = torch.arange(N_IMAGES) % len(CLASSES)
    metrics, intervals = {}, {}
    for split in ("val", "test") if with_test else ("val",):
        noise = torch.rand(N_IMAGES, len(CLASSES), generator=generator)
        probs = (noise + skill * torch.nn.functional.one_hot(labels, len(CLASSES))).softmax(1)  # skill: more right
        ids = [f"{split}_{i}" for i in range(N_IMAGES)]
        lesions = [f"{split}_lesion_{i // 2}" for i in range(N_IMAGES)] if lesions_named else ids  # two photos each
        known = [lesions_named] * N_IMAGES
        records = pd.DataFrame({"image_id": ids, "lesion_id": lesions, "lesion_known": known})
        predictions = SplitPredictions(probs, labels, torch.arange(N_IMAGES))
        metrics |= write_split_artifacts(run, split, predictions, records, CLASSES)
        intervals[split] = interval_method(known)
    metrics["val/loss"] = 1.5 + seed / 10  # of the best epoch's weights, which train() re-validates
    summary = RunSummary(
        task=TRAIN,
        status=COMPLETED,
        run_dir=str(run),
        backbone=backbone,
        seed=seed,
        metrics=metrics,
        interval_method=intervals,
        image_size=64,
        best_epoch=1,
        epochs=3,
        params_total=2_500_000,
        train_time_s=10.0 + seed,
        train_images_per_s=100.0 + seed,
        last_epoch={"val/loss": 1.8},
    )
    summary.write()
    return summary.to_dict()


@pytest.fixture
def sweep(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    folder = tmp_path / "multirun"
    runs = {
        "0_resnet50_seed0": make_run(folder, "0_resnet50_seed0", "resnet50", 0),
        "1_resnet50_seed1": make_run(folder, "1_resnet50_seed1", "resnet50", 1),
        "2_densenet121_seed0": make_run(folder, "2_densenet121_seed0", "densenet121", 0),
        "3_mobilenetv2_seed0": make_run(
            folder, "3_mobilenetv2_seed0", "mobilenetv2", 0, failed="TrainingDivergedError: train/loss became nan"
        ),
    }
    (folder / "4_efficientnet_b0_seed0" / ".hydra").mkdir(parents=True)  # a job killed before train() wrote anything
    OmegaConf.save(
        OmegaConf.create(["model=efficientnet_b0", "seed=0", "trainer.max_epochs=3"]),
        folder / "4_efficientnet_b0_seed0" / ".hydra" / "overrides.yaml",
    )
    return folder, runs


def test_seeds_pool_into_mean_and_std_and_failures_keep_their_error(sweep) -> None:
    folder, runs = sweep
    report = write_report(folder)
    for name in (
        "runs.csv",
        "summary.csv",
        "summary.md",
        "summary_metrics.png",
        "summary_confusion.png",
        "summary_roc.png",
    ):
        assert (folder / name).is_file(), name

    table = pd.read_csv(folder / "runs.csv").set_index("run")
    assert len(table) == 5
    for name, summary in runs.items():
        if summary["status"] == "completed":
            assert table.loc[name, "split"] == "test"
            for metric in ("acc", "top3_acc", "balanced_acc", "f1_macro", "auroc_macro", "recall_mel"):
                assert table.loc[name, metric] == pytest.approx(summary["metrics"][f"test/{metric}"])
            assert table.loc[name, "val_loss"] == pytest.approx(1.5 + summary["seed"] / 10)  # the best epoch's
    assert table.loc["3_mobilenetv2_seed0", "error"] == "TrainingDivergedError: train/loss became nan"
    assert table.loc["4_efficientnet_b0_seed0", "status"] == "failed"
    assert table.loc["4_efficientnet_b0_seed0", "error"] == NOT_FINISHED

    summary = pd.read_csv(folder / "summary.csv").set_index("backbone")
    resnet = [runs[f"{i}_resnet50_seed{i}"]["metrics"]["test/balanced_acc"] for i in (0, 1)]
    assert summary.loc["resnet50", "runs"] == 2
    assert summary.loc["resnet50", "seeds"] == "0,1"
    assert summary.loc["resnet50", "balanced_acc"] == pytest.approx(statistics.mean(resnet))
    assert summary.loc["resnet50", "balanced_acc_std"] == pytest.approx(statistics.stdev(resnet))
    assert summary.loc["resnet50", "train_time_s"] == pytest.approx(10.5)
    assert math.isnan(summary.loc["densenet121", "balanced_acc_std"])
    assert summary.loc["mobilenetv2", "status"] == "failed" and math.isnan(summary.loc["mobilenetv2", "rank"])
    completed = summary[summary["status"] == "completed"].sort_values("rank")
    assert list(completed["balanced_acc"]) == sorted(completed["balanced_acc"], reverse=True)
    assert list(completed["rank"]) == [1, 2]
    assert set(report.failed["run"]) == {"3_mobilenetv2_seed0", "4_efficientnet_b0_seed0"}

    done = report.summary[report.summary["status"] == "completed"].reset_index(drop=True)
    bars = error_bars(done, "balanced_acc")  # several seeds: ±std; one run: its bootstrap interval
    assert bars[0][done["backbone"] == "resnet50"] == pytest.approx(summary.loc["resnet50", "balanced_acc_std"])
    densenet = summary.loc["densenet121"]
    assert bars[1][done["backbone"] == "densenet121"] == pytest.approx(
        densenet["balanced_acc_ci_high"] - densenet["balanced_acc"]
    )

    markdown = (folder / "summary.md").read_text()
    assert "±" in markdown and "## Failed runs" in markdown
    assert "train/loss became nan" in markdown and NOT_FINISHED in markdown
    assert "**test**" in markdown


def test_rank_by_picks_the_split_and_the_direction(sweep) -> None:
    folder, runs = sweep
    write_report(folder, rank_by="val/f1_macro")
    table = pd.read_csv(folder / "runs.csv").set_index("run")
    assert table.loc["2_densenet121_seed0", "split"] == "val"
    assert table.loc["2_densenet121_seed0", "f1_macro"] == pytest.approx(
        runs["2_densenet121_seed0"]["metrics"]["val/f1_macro"]
    )
    summary = write_report(folder, rank_by="val_loss").summary
    ranked = summary.dropna(subset=["rank"]).sort_values("rank")
    assert list(ranked["val_loss"]) == sorted(ranked["val_loss"])  # lower is better
    with pytest.raises(ConfigError, match="not a report column"):
        write_report(folder, rank_by="test/accuracy")
    with pytest.raises(ConfigError, match="val or test"):
        write_report(folder, rank_by="train/balanced_acc")


def test_lesion_bootstrap_intervals_and_the_paired_comparison_with_rank_one(tmp_path: Path) -> None:
    folder = tmp_path / "sweep"
    strong = make_run(folder, "0_resnet50_seed0", "resnet50", 0, skill=0.6)
    runs = {"densenet121": make_run(folder, "1_densenet121_seed0", "densenet121", 0)}
    runs["mobilenetv2"] = make_run(folder, "2_mobilenetv2_seed0", "mobilenetv2", 0)
    summary = write_report(folder).summary.set_index("backbone")
    assert summary.loc["resnet50", "rank"] == 1
    for backbone, run in {"resnet50": strong, **runs}.items():
        score = run["metrics"]["test/balanced_acc"]
        low, high = summary.loc[backbone, ["balanced_acc_ci_low", "balanced_acc_ci_high"]]
        assert low < score < high
        assert (low, high) == (run["metrics"]["test/balanced_acc_ci_low"], run["metrics"]["test/balanced_acc_ci_high"])
    assert summary.loc["resnet50", list(PAIRED)].isna().all()  # rank 1 is the reference
    for backbone, run in runs.items():
        diff, low, high, p_better = summary.loc[backbone, list(PAIRED)]
        assert diff == pytest.approx(strong["metrics"]["test/balanced_acc"] - run["metrics"]["test/balanced_acc"])
        assert 0 < low < diff < high and p_better > 0.99  # clearly ahead, even on 28 images
    markdown = (folder / "summary.md").read_text()
    assert "## How sure is the ranking?" in markdown and "P(rank 1 better)" in markdown
    # The bar chart's error bars: the bootstrap interval of each single run (AUROC has none).
    done = summary.reset_index()
    bars = error_bars(done, "balanced_acc")
    np.testing.assert_allclose(bars[0], done["balanced_acc"] - done["balanced_acc_ci_low"])
    np.testing.assert_allclose(bars[1], done["balanced_acc_ci_high"] - done["balanced_acc"])
    assert np.isnan(error_bars(done, "auroc_macro")).all()

    # Runs scored on other images are not paired.
    other = make_run(tmp_path / "other", "0_mobilenetv2_seed0", "mobilenetv2", 0)
    assert other["metrics"]["test/balanced_acc_ci_low"] <= other["metrics"]["test/balanced_acc"]
    predictions = folder / "1_densenet121_seed0" / "predictions_test.csv"
    frame = pd.read_csv(predictions)
    frame.assign(image_id=frame["image_id"] + "_elsewhere").to_csv(predictions, index=False)
    summary = write_report(folder).summary.set_index("backbone")
    assert summary.loc["densenet121", list(PAIRED)].isna().all()
    assert not summary.loc["mobilenetv2", list(PAIRED)].isna().any()

    # A rank 1 written before lesion ids were recorded: no paired comparison (by image it would be too sure).
    predictions = folder / "0_resnet50_seed0" / "predictions_test.csv"
    pd.read_csv(predictions).drop(columns="lesion_id").to_csv(predictions, index=False)
    summary = write_report(folder).summary
    assert summary[list(PAIRED)].isna().all().all()
    markdown = (folder / "summary.md").read_text()
    assert "## How sure is the ranking?" in markdown and "P(rank 1 better)" not in markdown


def test_an_ablation_pairs_every_option_with_its_named_baseline_not_with_rank_one(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "ablation"
    baseline = make_run(folder, "0_lite0", "efficientnet_lite0", 0, extra=("ablation=baseline",), skill=0.3)
    better = make_run(folder, "1_lite0", "efficientnet_lite0", 0, extra=("ablation=better",), skill=0.9)
    worse = make_run(folder, "2_lite0", "efficientnet_lite0", 0, extra=("ablation=worse",))
    main([str(folder), "--reference", "ablation=baseline"])
    summary = pd.read_csv(folder / "summary.csv").set_index("config")
    assert summary.loc["ablation=better", "rank"] == 1  # ranked as ever, paired with the baseline
    assert summary.loc["ablation=baseline", list(PAIRED)].isna().all()
    for config, run in {"ablation=better": better, "ablation=worse": worse}.items():
        diff, low, high, _ = summary.loc[config, list(PAIRED)]
        expected = baseline["metrics"]["test/balanced_acc"] - run["metrics"]["test/balanced_acc"]
        assert diff == pytest.approx(expected) and low < diff < high
    assert summary.loc["ablation=better", "diff_ci_high"] < 0  # the option is clearly better than the baseline
    markdown = (folder / "summary.md").read_text()
    assert "`ablation=baseline` minus this" in markdown and "P(`ablation=baseline` better)" in markdown

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder), "--reference", "ablation=default"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "reference='ablation=default'" in error and "'ablation=baseline'" in error

    # At the end of a sweep a mistyped reference costs the pairing, not the report.
    (folder / "summary.md").unlink()
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(folder)}}})
    MultirunReport(reference="ablation=default").on_multirun_end(config=config)
    assert "P(rank 1 better)" in (folder / "summary.md").read_text()


def test_the_paired_benchmark_reports_each_option_minus_the_reference_on_the_same_images(
    tmp_path: Path, capsys
) -> None:
    from skinlesion.bench.__main__ import main as bench

    weak = make_run(tmp_path, "weak", "efficientnet_lite0", 0, skill=0.2)
    strong = make_run(tmp_path, "strong", "efficientnet_lite0", 0, skill=0.9)
    out = tmp_path / "paired.json"
    bench(["paired", str(tmp_path / "weak"), str(tmp_path / "strong" / "predictions_test.csv"), "--json", str(out)])
    (row,) = json.loads(out.read_text())["paired"]["rows"]
    expected = strong["metrics"]["test/balanced_acc"] - weak["metrics"]["test/balanced_acc"]
    assert row["difference"] == pytest.approx(expected) and 0 < row["low"] < expected < row["high"]
    assert row["p_a_better"] > 0.99
    assert f"predictions_test.csv | {expected:+.4f} |" in capsys.readouterr().out  # the markdown row
    other = make_run(tmp_path / "elsewhere", "other", "efficientnet_lite0", 0)
    frame = pd.read_csv(tmp_path / "elsewhere" / "other" / "predictions_test.csv")
    frame.assign(image_id=frame["image_id"] + "_x").to_csv(tmp_path / "elsewhere" / "other" / "predictions_test.csv")
    assert other["status"] == COMPLETED
    with pytest.raises(SystemExit) as exit_info:
        bench(["paired", str(tmp_path / "weak"), str(tmp_path / "elsewhere" / "other")])
    assert exit_info.value.code == 2 and "not the reference's images" in capsys.readouterr().err


def test_intervals_over_a_split_without_lesion_groupings_are_labelled_image_bootstrap(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    make_run(sweep, "0", "resnet50", 0, skill=3.0, lesions_named=False)
    make_run(sweep, "1", "mobilenetv2", 0, lesions_named=False)
    report = write_report(sweep)
    markdown = (sweep / "summary.md").read_text()
    assert "resample the split's **images**, not lesions" in markdown and "no lesion groupings" in markdown
    assert "resample the split's lesions" not in markdown
    assert pd.read_csv(sweep / "summary.csv")["ci_resampled"].tolist() == ["image", "image"]
    assert report.summary["diff_ci_low"].notna().any()  # the paired comparison still runs, over images

    # A metrics.json without the record: the predictions CSV's lesion_known column says the same.
    for run in ("0", "1"):
        data = json.loads((sweep / run / "metrics.json").read_text())
        write_json(sweep / run / "metrics.json", {k: v for k, v in data.items() if k != "interval_method"})
    assert write_report(sweep).summary["ci_resampled"].tolist() == ["image", "image"]


def test_runs_without_a_test_split_report_validation_and_configs_stay_apart(tmp_path: Path) -> None:
    folder = tmp_path / "sweep"
    make_run(folder, "0_resnet50_seed0", "resnet50", 0, with_test=False, extra=("optimizer.lr=0.001",))
    make_run(folder, "1_resnet50_seed0", "resnet50", 0, with_test=False, extra=("optimizer.lr=0.0001",))
    summary = write_report(folder).summary
    assert sorted(summary["config"]) == ["optimizer.lr=0.0001", "optimizer.lr=0.001"]  # not pooled as seeds
    assert set(summary["split"]) == {"val"}
    assert "**val**" in (folder / "summary.md").read_text()


def test_evaluation_folders_are_not_training_runs(tmp_path: Path) -> None:
    RunSummary(EVALUATE, COMPLETED, str(tmp_path / "eval")).write()
    with pytest.raises(DataError, match="no training runs"):
        write_report(tmp_path)


def test_command_line_writes_the_report_and_rejects_bad_input(sweep, capsys) -> None:
    folder, _ = sweep
    main([str(folder), "--rank-by", "test/auroc_macro"])
    out = capsys.readouterr().out
    assert "# Backbone comparison" in out and "resnet50" in out and str(folder / "summary.md") in out
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder / "missing")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_multirun_callback_writes_the_report_and_flags_the_failed_jobs(sweep) -> None:
    folder, _ = sweep
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(folder)}}})
    cli.FAILED_JOBS.clear()
    try:
        MultirunReport(rank_by="balanced_acc").on_multirun_end(config=config)
        assert (folder / "summary.md").is_file()
        assert set(cli.FAILED_JOBS) == {str(folder / "3_mobilenetv2_seed0"), str(folder / "4_efficientnet_b0_seed0")}
    finally:
        cli.FAILED_JOBS.clear()


def test_only_training_runs_are_collected(sweep) -> None:
    """Other tools' run folders (check, evaluate, predict) hold a Hydra record too; they are not runs."""
    folder, runs = sweep
    other = folder / "check_run" / ".hydra"
    other.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"name": "check"}}}), other / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(["data.root=/data"]), other / "overrides.yaml")
    training = folder / "0_resnet50_seed0" / ".hydra" / "hydra.yaml"
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"name": "train"}}}), training)
    names = {Path(run).name for run in find_runs(folder)}
    assert names == {*runs, "4_efficientnet_b0_seed0"}


def test_report_over_several_folders_merges_rows_without_duplicates(tmp_path: Path) -> None:
    """Two sweeps, one named twice and both reached again through their parent: each run is one row."""
    sweeps = tmp_path / "sweeps"
    a, b = sweeps / "a", sweeps / "b"
    make_run(a, "0_resnet50", "resnet50", 0)
    make_run(a, "1_mobilenetv2", "mobilenetv2", 0)
    make_run(b, "0_resnet50", "resnet50", 1)
    out = tmp_path / "compare"
    main([str(a), str(b), str(a), str(sweeps), "--output-dir", str(out)])
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["run"]) == ["a/0_resnet50", "a/1_mobilenetv2", "b/0_resnet50"]
    summary = pd.read_csv(out / "summary.csv").set_index("backbone")
    assert summary.loc["resnet50", "runs"] == 2  # the two sweeps' seeds of one configuration, pooled
    assert (out / "summary.md").is_file() and not (a / "summary.md").exists()
    with pytest.raises(ConfigError, match="--output-dir"):
        write_report([a, b])
